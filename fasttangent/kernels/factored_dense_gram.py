"""Fused factored Gram of a dense layer.

For y = W a + b, the per-example gradient of output k is g_k aᵀ, so
K[i, j] += (a_i · a'_j) Σ_k (g_ik · g'_jk).

A1: (n1, d_in), G1: (n1, c, d_out), A2: (n2, d_in), G2: (n2, c, d_out) -> (n1, n2).
"""
from __future__ import annotations

import torch

from ..backends import resolve


def factored_dense_gram_torch(A1, G1, A2=None, G2=None):
    """Reference: (A1 A2ᵀ) ⊙ Σ_k G1_k G2_kᵀ, materializing both n1×n2 factors."""
    A2 = A1 if A2 is None else A2
    G2 = G1 if G2 is None else G2
    acc = torch.promote_types(A1.dtype, torch.float32)
    AA = A1.to(acc) @ A2.to(acc).T
    GG = torch.einsum("ikd,jkd->ij", G1.to(acc), G2.to(acc))
    return AA * GG


def factored_dense_gram(A1, G1, A2=None, G2=None, *, out=None, backend="auto"):
    """K[i, j] = (A1[i]·A2[j]) Σ_k (G1[i,k]·G2[j,k]), added into ``out`` when given.

    A (n, d_in), G (n, c, d_out); ``A2, G2 = None`` means the symmetric case. Returns (n1, n2).
    """
    if (A2 is None) != (G2 is None):
        raise ValueError("pass both A2 and G2 for a cross Gram, or neither for the symmetric one")
    tensors = [t for t in (A1, G1, A2, G2) if t is not None]
    resolve(backend, *tensors, supports=("torch",), op="factored_dense_gram")
    K = factored_dense_gram_torch(A1, G1, A2, G2)
    if out is None:
        return K
    out += K.to(out.dtype)
    return out
