"""Linearity metrics: how far a network f_θ has moved from its linearization at a reference θ_ref.

    a = kernel_alignment(K1, K2)                       # ⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F)
    a = ntk_alignment(model, reference, x)             # KA(K_θ(x), K_ref(x))
    s = sign_similarity(model, reference, x)           # fraction of ReLU units with the same on/off status
    a = representation_alignment(model, reference, x)  # KA(R Rᵀ, R_ref R_refᵀ), R = last linear input
    probe = LinearityProbe(model, x); probe.measure(model)   # all three against a snapshot

Conventions shared by every function here:

- Metrics are taken on the network itself (f_θ), never on an α-scaled output. A
  ``fasttangent.AlphaScaled`` wrapper is accepted anywhere a model is and is unwrapped to
  its ``.model``.
- The model runs in eval mode (dropout off, BatchNorm on running statistics), and the
  training flag of every submodule is restored afterwards. Forward passes run without
  gradient; only ``ntk_gram`` differentiates, and it leaves ``.grad`` untouched. All hooks
  are removed, also when an error is raised, so the model is left exactly as it was given.
- ``backend=`` is passed through to the compute ops in ``fasttangent.kernels``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .alpha import AlphaScaled
from .kernels import alignment_terms, count_sign_matches, pack_signs, representation_alignment_terms

METRICS = ("sign_similarity", "ntk_alignment", "repr_alignment")

# A Gram whose (centered) Frobenius norm is below this many units of its dtype's rounding
# error, relative to its raw norm, is zero up to rounding: its alignment is undefined.
_ZERO_NORM_ULPS = 16



class UndefinedMetricError(ValueError):
    """A metric has no value here: an alignment with a Gram that is zero (e.g. every ReLU
    off, or outputs that do not depend on the parameters). ``LinearityProbe.measure(...,
    undefined="nan")`` reports such a metric as NaN instead of raising."""


# ----------------------------------------------------------------------------- helpers

def _unwrap(model: nn.Module) -> nn.Module:
    """The network f_θ behind an ``AlphaScaled`` wrapper (metrics are on f_θ, not f^α)."""
    if isinstance(model, AlphaScaled):
        return model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module (or fasttangent.AlphaScaled), got {type(model).__name__}")
    return model


@contextlib.contextmanager
def _evaluating(*models: nn.Module):
    """Eval mode for the duration; each submodule's own training flag is restored after
    (set directly, so modules whose ``train()`` is overridden keep their state too)."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _hooked(modules, hook, *, pre: bool = False):
    """Register ``hook`` as a forward (or forward-pre) hook on each module; always remove it."""
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(m, register)(hook) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _check_norm(sq_norm: torch.Tensor, raw_sq_norm: torch.Tensor, dtype: torch.dtype, what: str,
                centered: bool) -> None:
    """Raise when a Gram's squared norm is not finite or is zero up to rounding; ``raw_sq_norm``
    is the squared norm before centering, the scale that rounding errors are relative to."""
    if not torch.isfinite(sq_norm) or not torch.isfinite(raw_sq_norm):
        raise ValueError(f"{what} contains NaN or inf; check the model's outputs and parameters for overflow")
    tolerance = (_ZERO_NORM_ULPS * torch.finfo(dtype).eps) ** 2 * raw_sq_norm
    if raw_sq_norm == 0 or sq_norm <= tolerance:
        centering = (" after centering (a constant Gram, or identical representations for every "
                     "example, centers to zero; use centered=False)") if centered else ""
        raise UndefinedMetricError(f"{what} is zero{centering}, so its alignment ⟨K1,K2⟩/(‖K1‖‖K2‖) is undefined; "
                         "check that the model's outputs depend on its parameters and inputs")


def _alignment(cross, sq1, sq2, dtype) -> torch.Tensor:
    return (cross / (sq1.sqrt() * sq2.sqrt())).to(dtype)


# ------------------------------------------------------------------------ kernel alignment

def flatten_gram(K: torch.Tensor) -> torch.Tensor:
    """A Gram as a matrix: (n1, n2) is returned as is; a full Gram (n1, n2, c, c) becomes
    (n1·c, n2·c) with row i·c + a and column j·c + b holding K[i, j, a, b], i.e. indexed by
    (example, output) pairs, so that it equals J1 J2ᵀ for J (n·c, p) stacked by example."""
    if K.dim() == 2:
        return K
    if K.dim() == 4:
        n1, n2, c1, c2 = K.shape
        return K.permute(0, 2, 1, 3).reshape(n1 * c1, n2 * c2)
    raise ValueError(f"a Gram must be 2-d (n1, n2) or 4-d (n1, n2, c, c), got shape {tuple(K.shape)}; "
                     "compute it with fasttangent.ntk_gram")


def kernel_alignment(K1: torch.Tensor, K2: torch.Tensor, centered: bool = False, *,
                     backend: str = "auto") -> torch.Tensor:
    """Kernel alignment KA(K1, K2) = ⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F) = Tr[K1 K2ᵀ] / (‖K1‖_F ‖K2‖_F).

    Args:
        K1, K2: Grams of the same shape, (n1, n2) or full (n1, n2, c, c); a full Gram is first
            flattened to (n1·c, n2·c) over (example, output) pairs (see ``flatten_gram``).
        centered: centered kernel alignment (CKA): both matrices are replaced by H K H with
            H = I − 11ᵀ/m on the flattened (m, m) matrix (row and column means removed).
        backend: passed to ``fasttangent.kernels.alignment_terms``.

    Returns:
        a 0-d tensor in [-1, 1] (in [0, 1] for positive semi-definite Grams), in the inputs'
        floating dtype (the torch backend accumulates the sums in float64).
    """
    if K1.shape != K2.shape:
        raise ValueError(f"Grams have different shapes {tuple(K1.shape)} and {tuple(K2.shape)}; "
                         "compute both on the same inputs with the same outputs= option")
    dtype = _float_dtype(K1, K2)
    M1, M2 = flatten_gram(K1), flatten_gram(K2)
    cross, sq1, sq2 = alignment_terms(M1, M2, centered=centered, backend=backend)
    for name, M, sq in (("K1", M1, sq1), ("K2", M2, sq2)):
        raw = M.to(torch.promote_types(M.dtype, torch.float64)).square().sum() if centered else sq
        _check_norm(sq, raw, dtype, f"Gram {name}", centered)
    return _alignment(cross, sq1, sq2, dtype)


def _ntk_gram(model: nn.Module, x: torch.Tensor, outputs, backend: str, gram_options: dict) -> torch.Tensor:
    # imported here: fasttangent.ntk is heavier than the metrics and optional for most of them
    from .ntk import ntk_gram

    with _evaluating(model):
        # a metric is a number, not part of a graph: drop any autograd history
        return ntk_gram(model, x, outputs=outputs, backend=backend, **gram_options).detach()


def ntk_alignment(model: nn.Module, reference, x: torch.Tensor, outputs="trace", backend: str = "auto", *,
                  centered: bool = False, **gram_options) -> torch.Tensor:
    """NTK alignment KA(K_θ(x, x), K_ref(x, x)) between the model's empirical NTK and a reference.

    Args:
        model: the network f_θ (an ``AlphaScaled`` is unwrapped to its ``.model``).
        reference: an nn.Module (its NTK is computed on ``x``) or a precomputed Gram from
            ``fasttangent.ntk_gram(reference, x, outputs=outputs)``.
        x: probe inputs (n, ...).
        outputs: "trace" (Σ_a J_a J_aᵀ, (n, n)), "full" ((n, n, c, c), flattened over
            (example, output) pairs before aligning) or an int k (output k only).
        backend: passed to ``ntk_gram`` and the alignment op.
        centered: centered kernel alignment (see ``kernel_alignment``).
        **gram_options: further keywords of ``fasttangent.ntk_gram`` (block_size, reduce,
            memory_budget, conv_form).

    Returns:
        a 0-d tensor, 1 when the NTK has not changed (up to scale).
    """
    K = _ntk_gram(_unwrap(model), x, outputs, backend, gram_options)
    if isinstance(reference, torch.Tensor):
        K_ref = reference.to(K.device)
    else:
        K_ref = _ntk_gram(_unwrap(reference), x, outputs, backend, gram_options)
    if K_ref.shape != K.shape:
        raise ValueError(f"the reference Gram has shape {tuple(K_ref.shape)} but the model's Gram on x with "
                         f"outputs={outputs!r} has shape {tuple(K.shape)}; compute the reference with "
                         "fasttangent.ntk_gram on the same x and the same outputs=")
    return kernel_alignment(K, K_ref, centered=centered, backend=backend)


# ---------------------------------------------------------------------------- ReLU signs

@dataclass(frozen=True)
class SignRecord:
    """The on/off pattern (output > 0) of every nn.ReLU call of one forward pass, bit-packed.

    Attributes:
        words: per ReLU call, in call order, int32 (⌈numel/32⌉,) words from
            ``fasttangent.kernels.pack_signs`` (bit b of word w: element 32·w + b is on).
        numels: per call, the number of units (elements of the ReLU output, all examples).
        layers: per call, the dotted name of the nn.ReLU module that was called.
        input_shape: the shape of the inputs x the pattern was recorded on.
        input_sums: (n, 2) float64 per-example sums of x and of x², so that a comparison on
            other inputs of the same shape is caught (``_input_sums``).
    """

    words: tuple
    numels: tuple
    layers: tuple
    input_shape: tuple
    input_sums: torch.Tensor

    @property
    def units(self) -> int:
        """Total number of ReLU units over all calls and examples."""
        return sum(self.numels)


def _relu_names(model: nn.Module, op: str) -> dict:
    """{nn.ReLU module: dotted name}; raises when there is none to hook."""
    names = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            names.setdefault(m, name or type(model).__name__)
    if not names:
        raise ValueError(f"{op}: the model {type(model).__name__} has no nn.ReLU modules. Sign patterns are "
                         "read with forward hooks on nn.ReLU modules, and functional calls (torch.relu, "
                         "F.relu, Tensor.relu) are invisible to hooks; use nn.ReLU modules in the model")
    return names


def _visit_relu_outputs(model: nn.Module, x: torch.Tensor, visit, op: str) -> None:
    """Run model(x) (eval mode, no gradient) and call ``visit(name, output)`` at every nn.ReLU
    call, in call order, while the output is live; nothing is kept unless ``visit`` keeps it.
    Raises when the model's output has NaN or inf (a NaN unit would count as off)."""
    names = _relu_names(model, op)

    def hook(module, inputs, output):
        visit(names[module], output)

    with _evaluating(model), torch.no_grad(), _hooked(names, hook):
        out = model(x)
    leaves, _ = tree_flatten(out)
    if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all() for t in leaves):
        raise ValueError(f"{op}: the model's output on x contains NaN or inf, so its ReLU states are meaningless; "
                         "check x and the model's parameters for NaN/inf or overflow")


def _input_sums(x: torch.Tensor) -> torch.Tensor:
    """(n, 2) float64 per-example Σx and Σx² on the CPU: a cheap fingerprint of the inputs."""
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    return torch.stack([flat.sum(dim=1), flat.square().sum(dim=1)], dim=1).cpu()


def _same_inputs(recorded: torch.Tensor, sums: torch.Tensor) -> bool:
    """Equal fingerprints up to the rounding of a sum computed on another device."""
    scale = recorded.abs().max().clamp_min(1.0)
    return bool(torch.allclose(sums, recorded, rtol=1e-9, atol=1e-9 * float(scale)))


# wrappers that prefix every module name (DataParallel / DistributedDataParallel, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _bare_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def record_signs(model: nn.Module, x: torch.Tensor, *, backend: str = "auto") -> SignRecord:
    """Record the ReLU on/off pattern of ``model`` on ``x`` for later ``sign_similarity`` calls.

    Every call of every nn.ReLU module is recorded (conv feature maps included; a module
    called twice gives two entries), bit-packed: n·(units per example)/8 bytes in all.

    Args:
        model: the network (an ``AlphaScaled`` is unwrapped); it must use nn.ReLU modules.
        x: probe inputs (n, ...).
        backend: passed to ``fasttangent.kernels.pack_signs``.

    Returns:
        a ``SignRecord``.
    """
    words, numels, layers = [], [], []

    def visit(name, output):
        words.append(pack_signs(output, backend=backend))
        numels.append(output.numel())
        layers.append(name)

    _visit_relu_outputs(_unwrap(model), x, visit, "record_signs")
    if not words:
        raise ValueError("record_signs: the model has nn.ReLU modules but its forward called none of them "
                         "(functional relu calls are invisible to hooks); call the nn.ReLU modules in forward")
    return SignRecord(tuple(words), tuple(numels), tuple(layers), tuple(x.shape), _input_sums(x))


def sign_similarity(model: nn.Module, reference, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Fraction of ReLU units whose status (output > 0) equals the reference's.

        s = (1/N) Σ_calls Σ_units 1[ z(θ) > 0 ] == 1[ z(θ_ref) > 0 ]

    over every call of every nn.ReLU module (conv feature maps included) and all n examples;
    N is the total number of units. Agreements are counted inside the hooks with
    ``fasttangent.kernels.count_sign_matches``; no activation is kept.

    Args:
        model: the network f_θ (an ``AlphaScaled`` is unwrapped).
        reference: an nn.Module of the same architecture, or a ``SignRecord`` from
            ``record_signs(reference, x)`` on the same inputs.
        x: probe inputs (n, ...).
        backend: passed to the sign ops.

    Returns:
        a 0-d float64 tensor in [0, 1].
    """
    if isinstance(reference, SignRecord):
        record = reference
    elif isinstance(reference, nn.Module):
        record = record_signs(reference, x, backend=backend)
    else:
        raise TypeError(f"reference must be an nn.Module or a SignRecord from fasttangent.record_signs, "
                        f"got {type(reference).__name__}")
    if tuple(x.shape) != record.input_shape:
        raise ValueError(f"the reference signs were recorded on inputs of shape {record.input_shape}, but x has "
                         f"shape {tuple(x.shape)}; record them with record_signs(reference, x) on the same x")
    if not _same_inputs(record.input_sums, _input_sums(x)):
        raise ValueError("the reference signs were recorded on other inputs than x (same shape, other values); "
                         "record them with record_signs(reference, x) on the same x")
    matches = []

    def visit(name, output):
        k = len(matches)
        if (k >= len(record.numels) or output.numel() != record.numels[k]
                or _bare_name(name) != _bare_name(record.layers[k])):
            raise ValueError(_sign_mismatch(record, k, name, output.numel()))
        matches.append(count_sign_matches(output, record.words[k].to(output.device), backend=backend))

    _visit_relu_outputs(_unwrap(model), x, visit, "sign_similarity")
    if len(matches) != len(record.numels):
        raise ValueError(f"the model made {len(matches)} nn.ReLU calls but the reference made "
                         f"{len(record.numels)}; the reference comes from a different architecture: record it "
                         "on a model of the same architecture")
    return torch.stack(matches).sum().to(torch.float64) / record.units


def _sign_mismatch(record: SignRecord, k: int, name: str, numel: int) -> str:
    if k >= len(record.numels):
        theirs = f"the reference made only {len(record.numels)} nn.ReLU calls"
    else:
        theirs = f"the reference's call {k} was '{record.layers[k]}' with {record.numels[k]}"
    return (f"the model's nn.ReLU call {k} is '{name}' with {numel} units but {theirs}; the reference comes from "
            "a different architecture: record it on a model of the same architecture and the same x")


# ------------------------------------------------------------------------ representations

def _find_layer(model: nn.Module, layer) -> tuple:
    """(module, dotted name) for ``layer`` given as a submodule of ``model`` or its dotted name."""
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer), layer
        except AttributeError:
            raise ValueError(f"the model {type(model).__name__} has no submodule {layer!r}; pass a dotted name "
                             "from model.named_modules() or the module itself") from None
    if isinstance(layer, nn.Module):
        for name, m in model.named_modules():
            if m is layer:
                return m, name
        raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model; pass one of the model's "
                         "own modules or its dotted name (from model.named_modules())")
    raise TypeError(f"layer must be None, an nn.Module or a dotted name, got {type(layer).__name__}")


def representations(model: nn.Module, x: torch.Tensor, layer=None) -> torch.Tensor:
    """The representation R (n, d) of the probe inputs: the input of a layer, flattened per example.

    Args:
        model: the network (an ``AlphaScaled`` is unwrapped).
        x: probe inputs (n, ...).
        layer: ``None`` for the input of the last nn.Linear *called* in the forward pass (the
            last representation before the output layer); otherwise a submodule of ``model``
            or its dotted name, whose input (first positional argument; the last call's if it
            is called more than once) is returned.

    Returns:
        R (n, d), d the number of input elements per example (eval mode, no gradient).
    """
    model = _unwrap(model)
    if layer is None:
        watched = {m: name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        if not watched:
            raise ValueError(f"the model {type(model).__name__} has no nn.Linear module, so there is no default "
                             "representation; pass layer= (a submodule or its dotted name) to use its input")
    else:
        module, name = _find_layer(model, layer)
        watched = {module: name}
    last = {}

    def hook(module, inputs):
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            raise ValueError(f"layer '{watched[module]}' was called without a positional tensor input; pass "
                             "layer= a module whose first argument is the representation")
        # a copy: later in-place ops of the forward may overwrite the layer's input
        last["name"], last["R"] = watched[module], inputs[0].detach().clone()

    with _evaluating(model), torch.no_grad(), _hooked(watched, hook, pre=True):
        model(x)
    if "R" not in last:
        what = "no nn.Linear" if layer is None else f"layer '{next(iter(watched.values()))}'"
        raise ValueError(f"the forward pass of {type(model).__name__} never called {what}; "
                         "pass layer= a module that the forward pass calls")
    R = last["R"]
    if R.dim() == 0 or R.shape[0] != x.shape[0]:
        raise ValueError(f"the input of layer '{last['name']}' has shape {tuple(R.shape)}, whose first dimension "
                         f"is not the {x.shape[0]} examples of x; pass layer= a module that sees one row per example")
    return R.reshape(x.shape[0], -1)


def _layer_name(model: nn.Module, layer):
    """The dotted name of ``layer`` in ``model`` (or None), so it can be found in another instance."""
    return layer if layer is None or isinstance(layer, str) else _find_layer(model, layer)[1]


def representation_alignment(model: nn.Module, reference, x: torch.Tensor, layer=None, centered: bool = False, *,
                             backend: str = "auto") -> torch.Tensor:
    """Representation alignment KA(R Rᵀ, R_ref R_refᵀ) of the n×n example Grams.

    Computed through ``fasttangent.kernels.representation_alignment_terms`` as
    ⟨R1 R1ᵀ, R2 R2ᵀ⟩_F = ‖R1ᵀ R2‖²_F, in O(n d²) without n×n matrices when d < n. ``centered``
    uses H R Rᵀ H = (H R)(H R)ᵀ, i.e. R with its mean over examples removed (CKA).

    Args:
        model: the network f_θ (an ``AlphaScaled`` is unwrapped).
        reference: an nn.Module (its representation is taken at the same ``layer``, found by
            name) or a precomputed R_ref (n, d') from ``representations(reference, x, layer)``;
            d' may differ from d.
        x: probe inputs (n, ...).
        layer: see ``representations``.
        centered: centered kernel alignment.
        backend: passed to the alignment op.

    Returns:
        a 0-d tensor in [0, 1], in R's floating dtype.
    """
    model = _unwrap(model)
    R1 = representations(model, x, layer)
    if isinstance(reference, torch.Tensor):
        R2 = reference.to(R1.device)
    else:
        R2 = representations(_unwrap(reference), x, _layer_name(model, layer))
    if R2.dim() != 2 or R2.shape[0] != R1.shape[0]:
        raise ValueError(f"the reference representation has shape {tuple(R2.shape)} but the model's is "
                         f"{tuple(R1.shape)}; compute it with representations(reference, x) on the same x")
    return _representation_alignment(R1, R2, centered, backend)


def _representation_alignment(R1, R2, centered, backend):
    dtype = _float_dtype(R1, R2)
    raw = [_representation_gram_sq_norm(R) for R in (R1, R2)] if centered else None
    if centered:
        # the mean is removed in float64, then the op gets the inputs' own dtype back
        R1, R2 = (_center_rows(R) for R in (R1, R2))
    cross, sq1, sq2 = representation_alignment_terms(R1, R2, backend=backend)
    raw1, raw2 = raw if centered else (sq1, sq2)
    _check_norm(sq1, raw1, dtype, "the model's representation Gram R Rᵀ", centered)
    _check_norm(sq2, raw2, dtype, "the reference representation Gram R Rᵀ", centered)
    return _alignment(cross, sq1, sq2, dtype)


def _center_rows(R: torch.Tensor) -> torch.Tensor:
    """H R with H = I − 11ᵀ/n, so that (H R)(H R)ᵀ = H R Rᵀ H."""
    R64 = R.to(torch.promote_types(R.dtype, torch.float64))
    return (R64 - R64.mean(dim=0)).to(R.dtype)


def _representation_gram_sq_norm(R: torch.Tensor) -> torch.Tensor:
    """‖R Rᵀ‖²_F = ‖Rᵀ R‖²_F, through the smaller of the two."""
    R = R.to(torch.promote_types(R.dtype, torch.float64))
    small = R.T @ R if R.shape[1] < R.shape[0] else R @ R.T
    return small.square().sum()


# ---------------------------------------------------------------------------------- probe

class LinearityProbe:
    """The three linearity metrics of a network against a snapshot of its reference state.

    At construction the reference state is snapshotted as what the metrics compare with,
    which is exact and cheaper than a copy of the parameters: the packed ReLU signs
    (n·units/8 bytes), the NTK Gram on x ((n, n) or (n, n, c, c)) and the representation
    R (n, d). Later training of ``model`` does not change the snapshot.

        probe = LinearityProbe(model, x)        # reference θ_ref = current parameters
        ...train...
        probe.measure(model)   # {"sign_similarity": s, "ntk_alignment": a, "repr_alignment": r}

    Args:
        model: the network f_θ (an ``AlphaScaled`` is unwrapped to its ``.model``).
        x: probe inputs (n, ...), kept (a copy) for every measurement.
        outputs: the NTK Gram's outputs option (see ``fasttangent.ntk_gram``).
        backend: passed to every op.
        layer: the representation layer (see ``representations``); a module is remembered by
            its dotted name so that ``measure`` also works on another instance (e.g. a copy).
        centered: centered alignments (CKA) for the NTK and representation metrics.
        metrics: which of "sign_similarity", "ntk_alignment", "repr_alignment" to compute.
            ``None`` means all three, except that "sign_similarity" is skipped (no key in the
            result) when the model has no nn.ReLU module; asking for it explicitly then raises.
        **gram_options: further keywords of ``fasttangent.ntk_gram`` (block_size, reduce, ...).

    ``measure(model=None)`` returns {metric: float}; ``model=None`` measures the model given
    at construction (in its current state).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, outputs="trace", backend: str = "auto", *,
                 layer=None, centered: bool = False, metrics=None, **gram_options):
        self.model = _unwrap(model)
        self.x = x.detach().clone()
        self.outputs, self.backend, self.centered, self.gram_options = outputs, backend, centered, gram_options
        self.layer = _layer_name(self.model, layer)
        self.metrics = self._chosen_metrics(self.model, metrics)
        self.signs = record_signs(self.model, self.x, backend=backend) if "sign_similarity" in self.metrics else None
        self.gram = (_ntk_gram(self.model, self.x, outputs, backend, gram_options)
                     if "ntk_alignment" in self.metrics else None)
        self.representation = (representations(self.model, self.x, self.layer)
                               if "repr_alignment" in self.metrics else None)

    @staticmethod
    def _chosen_metrics(model: nn.Module, metrics) -> tuple:
        if metrics is None:
            has_relu = any(isinstance(m, nn.ReLU) for m in model.modules())
            return METRICS if has_relu else METRICS[1:]
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {METRICS}")
        return metrics

    def measure(self, model: nn.Module | None = None, *, undefined: str = "raise") -> dict:
        """{metric name: float} for ``model`` (default: the model given at construction).

        ``undefined="nan"`` reports a metric that has no value (``UndefinedMetricError``:
        an alignment with a zero Gram, e.g. once every ReLU is off) as NaN, so that a training
        log goes on; ``"raise"`` (the default) raises it."""
        if undefined not in ("raise", "nan"):
            raise ValueError(f"undefined={undefined!r} is invalid; use 'raise' or 'nan'")
        model = self.model if model is None else _unwrap(model)
        measures = {
            "sign_similarity": lambda: sign_similarity(model, self.signs, self.x, backend=self.backend),
            "ntk_alignment": lambda: ntk_alignment(model, self.gram, self.x, self.outputs, self.backend,
                                                   centered=self.centered, **self.gram_options),
            "repr_alignment": lambda: representation_alignment(model, self.representation, self.x, self.layer,
                                                               self.centered, backend=self.backend),
        }
        result = {}
        for name in METRICS:
            if name in self.metrics:
                try:
                    result[name] = float(measures[name]())
                except UndefinedMetricError:
                    if undefined == "raise":
                        raise
                    result[name] = math.nan
        return result

    def __repr__(self) -> str:
        return (f"LinearityProbe(n={self.x.shape[0]}, metrics={self.metrics}, outputs={self.outputs!r}, "
                f"centered={self.centered})")
