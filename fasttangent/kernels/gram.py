"""Blocked Gram product K (+)= J1 J2ᵀ; symmetric when J2 is None.

J1: (n1, p), J2: (n2, p) -> out: (n1, n2). Streaming parameter chunks into the same
``out`` accumulates the Gram of all of them.
"""
from __future__ import annotations

import torch

from ..backends import resolve


def gram_torch(J1: torch.Tensor, J2: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: J1 J2ᵀ with fp32-or-better accumulation."""
    acc = torch.promote_types(J1.dtype, torch.float32)
    J2 = J1 if J2 is None else J2
    return J1.to(acc) @ J2.to(acc).T


def gram(J1: torch.Tensor, J2: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
         backend: str = "auto") -> torch.Tensor:
    """K = J1 J2ᵀ, added into ``out`` when given (then ``out`` is returned).

    J1 (n1, p), J2 (n2, p) or None for the symmetric J1 J1ᵀ. Returns (n1, n2).
    """
    tensors = (J1,) if J2 is None else (J1, J2)
    resolve(backend, *tensors, supports=("torch",), op="gram")
    K = gram_torch(J1, J2)
    if out is None:
        return K
    out += K.to(out.dtype)
    return out
