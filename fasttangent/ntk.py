"""Empirical neural tangent kernel Gram matrices, structured per layer.

    K = ntk_gram(model, x1)                        # (n1, n1), Σ over outputs (trace)
    K = ntk_gram(model, x1, x2, outputs="full")    # (n1, n2, c, c)
    K = ntk_gram(model, x1, x2, outputs=3)         # (n1, n2), output 3 alone

K[i, j, a, b] = J_a(x_i) · J_b(x'_j) with J_a(x) = ∂f_a(x)/∂θ over every parameter
with ``requires_grad``. The Jacobian is never formed: per layer, the Gram term is built
from the layer's inputs and output cotangents (``fasttangent.gram``).
"""
from __future__ import annotations

import torch
from torch import nn

from .gram.engine import compute_gram


def ntk_gram(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *, outputs="trace",
             backend: str = "auto", block_size: int | None = None, reduce: str = "sum",
             memory_budget: int | None = None, conv_form: str = "auto") -> torch.Tensor:
    """Empirical NTK Gram of ``model`` between inputs ``x1`` (n1, ...) and ``x2`` (n2, ...).

    K[i, j, a, b] = Σ_θ ∂f_a(x1_i)/∂θ · ∂f_b(x2_j)/∂θ over the parameters with
    ``requires_grad``; the model maps (n, ...) to (n, c) (an output (n,) is c = 1).

    Args:
        model: an ``nn.Module`` in which examples are independent and deterministic
            (BatchNorm and Dropout in eval mode: call ``model.eval()``). Modules with a
            registered rule (Linear, Conv1d/2d, BatchNorm, LayerNorm, GroupNorm; see
            ``fasttangent.gram.register_rule``) use structured formulas; other parameter
            owners use per-example torch.func.
        x1: (n1, ...) inputs.
        x2: (n2, ...) inputs with the same trailing shape, or None for x2 = x1 (then only
            block pairs b1 <= b2 are computed and the rest mirrored).
        outputs: "trace" -> (n1, n2) Σ_a K[:, :, a, a]; "full" -> (n1, n2, c, c);
            an int k in [0, c) -> (n1, n2) K[:, :, k, k] (one backward pass instead of c;
            negative indices are refused, as an easy off-by-one).
        backend: "auto" | "torch" | "triton" | "cuda", passed to the Gram ops of
            ``fasttangent.kernels``.
        block_size: examples per block; None picks the largest block whose estimated
            memory (two blocks: recorded activations, the cotangents of a chunk of outputs,
            unfolded patches, materialized per-example gradients) fits ``memory_budget``.
        reduce: "sum" (default) or "mean" over outputs for ``outputs="trace"``.
        memory_budget: bytes for the block and output-chunk estimate, the factored
            layers' temporaries and the pieces in which large terms are streamed (see
            ``fasttangent.gram.engine``); None: a quarter of the free GPU memory on CUDA,
            a quarter of the available host memory on CPU
            (``fasttangent.gram.engine.default_memory_budget``).
        conv_form: "auto" (cost model, ``fasttangent.gram.cost``), "factored" or
            "materialized": how convolution / sequence-Linear weight terms are computed.

    Returns:
        (n1, n2) or (n1, n2, c, c), in the model's dtype promoted to at least float32.
    """
    # torch.compile's wrapper: the rules' hooks need the eager module (same parameters)
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    # the Gram is a measurement: hand back no autograd history (captured layer inputs carry some)
    return compute_gram(model, x1, x2, outputs=outputs, backend=backend, block_size=block_size, reduce=reduce,
                        memory_budget=memory_budget, conv_form=conv_form).detach()
