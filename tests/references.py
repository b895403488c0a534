"""Independent references for the Gram tests: plain autograd, one example and one output
at a time (no torch.func, whose vmap rules are part of what some tests exercise)."""
from __future__ import annotations

import torch
from torch import nn


def loop_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J (n, c, p): the gradient of output a of example i with respect to all trainable
    parameters (in ``model.parameters()`` order), from one autograd call per (i, a)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        per_output = []
        for a in range(out.shape[0]):
            grads = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per_output.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                         for g, p in zip(grads, params)]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def loop_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Trace Gram Σ_a J_a J_aᵀ (n, n) from ``loop_jacobian``."""
    J = loop_jacobian(model, x)
    return torch.einsum("iap,jap->ij", J, J)


def lean_loop_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``loop_reference`` holding one output's Jacobian (n, p) at a time (large models)."""
    params = [p for p in model.parameters() if p.requires_grad]
    outs = [model(x[i:i + 1]).reshape(-1) for i in range(x.shape[0])]
    K = torch.zeros(x.shape[0], x.shape[0], dtype=outs[0].dtype)
    for a in range(outs[0].shape[0]):
        J = torch.stack([torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                    for g, p in zip(torch.autograd.grad(out[a], params, retain_graph=True,
                                                                        allow_unused=True), params)])
                         for out in outs])
        K += J @ J.T
    return K
