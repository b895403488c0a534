"""Alignment reductions: ⟨K1, K2⟩_F, ‖K1‖²_F, ‖K2‖²_F (optionally centered), and the
representation route ⟨R1R1ᵀ, R2R2ᵀ⟩_F = ‖R1ᵀR2‖²_F.
"""
from __future__ import annotations

import torch

from ..backends import resolve


def _center(K: torch.Tensor) -> torch.Tensor:
    """H K H with H = I − 11ᵀ/n, i.e. double centering."""
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def alignment_terms_torch(K1, K2, centered=False):
    acc = torch.promote_types(K1.dtype, torch.float64)
    K1, K2 = K1.to(acc), K2.to(acc)
    if centered:
        K1, K2 = _center(K1), _center(K2)
    return (K1 * K2).sum(), (K1 * K1).sum(), (K2 * K2).sum()


def alignment_terms(K1: torch.Tensor, K2: torch.Tensor, *, centered: bool = False, backend: str = "auto"):
    """Return (⟨K1,K2⟩_F, ‖K1‖²_F, ‖K2‖²_F) as 0-d tensors; K1, K2 (m, m). ``centered``
    applies H·H to both first (CKA)."""
    if K1.shape != K2.shape:
        raise ValueError(f"Grams have different shapes {tuple(K1.shape)} and {tuple(K2.shape)}")
    resolve(backend, K1, K2, supports=("torch",), op="alignment_terms")
    return alignment_terms_torch(K1, K2, centered)


def representation_alignment_terms(R1: torch.Tensor, R2: torch.Tensor, *, backend: str = "auto"):
    """(⟨R1R1ᵀ, R2R2ᵀ⟩_F, ‖R1R1ᵀ‖²_F, ‖R2R2ᵀ‖²_F) for R (n, d), without forming n×n
    matrices when d < n: ⟨R1R1ᵀ, R2R2ᵀ⟩_F = ‖R1ᵀR2‖²_F (O(n d²) instead of O(n² d))."""
    if R1.shape[0] != R2.shape[0]:
        raise ValueError(f"representations cover {R1.shape[0]} and {R2.shape[0]} examples; use the same inputs")
    resolve(backend, R1, R2, supports=("torch",), op="representation_alignment_terms")
    acc = torch.promote_types(R1.dtype, torch.float64)
    R1, R2 = R1.to(acc), R2.to(acc)
    if max(R1.shape[1], R2.shape[1]) < R1.shape[0]:
        cross = (R1.T @ R2).square().sum()
        n1 = (R1.T @ R1).square().sum()
        n2 = (R2.T @ R2).square().sum()
        return cross, n1, n2
    return alignment_terms_torch(R1 @ R1.T, R2 @ R2.T)
