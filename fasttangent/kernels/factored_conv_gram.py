"""Fused factored Gram of an unfolded convolution or sequence layer.

With A_i (T, d_in) the unfolded input patches of example i and G_ik (T, d_out) the
cotangent of output k at each position, the weight-gradient Gram term is
K[i, j] += Σ_k ⟨A_i A_jᵀ, G_ik G_jkᵀ⟩_F = Σ_k Σ_{t,s} (a_it·a'_js)(g_ikt·g'_jks).

A1: (n1, T1, d_in), G1: (n1, c, T1, d_out), A2: (n2, T2, d_in), G2: (n2, c, T2, d_out).
"""
from __future__ import annotations

import torch

from ..backends import resolve


def factored_conv_gram_torch(A1, G1, A2=None, G2=None):
    """Reference: the unfused composition, materializing every T1×T2 product."""
    A2 = A1 if A2 is None else A2
    G2 = G1 if G2 is None else G2
    acc = torch.promote_types(A1.dtype, torch.float32)
    AA = torch.einsum("itd,jsd->ijts", A1.to(acc), A2.to(acc))
    GG = torch.einsum("iktd,jksd->ijts", G1.to(acc), G2.to(acc))
    return (AA * GG).sum(dim=(2, 3))


def factored_conv_gram(A1, G1, A2=None, G2=None, *, out=None, backend="auto"):
    """K[i, j] = Σ_k ⟨A1_i A2_jᵀ, G1_ik G2_jkᵀ⟩_F, added into ``out`` when given. Returns (n1, n2)."""
    if (A2 is None) != (G2 is None):
        raise ValueError("pass both A2 and G2 for a cross Gram, or neither for the symmetric one")
    tensors = [t for t in (A1, G1, A2, G2) if t is not None]
    resolve(backend, *tensors, supports=("torch",), op="factored_conv_gram")
    K = factored_conv_gram_torch(A1, G1, A2, G2)
    if out is None:
        return K
    out += K.to(out.dtype)
    return out
