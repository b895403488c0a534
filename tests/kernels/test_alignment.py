"""Alignment reductions (⟨K1,K2⟩_F, ‖K1‖², ‖K2‖², plain and centered) and the representation
route, against float64 torch compositions."""
import importlib

import pytest
import torch

from fasttangent.kernels.alignment import (alignment_terms, alignment_terms_torch, alignment_terms_triton,
                                           representation_alignment_terms)

alignment_module = importlib.import_module("fasttangent.kernels.alignment")


def _grams(m, dtype, rng, symmetric=True):
    """Gram-like matrices with a large constant part (NTK Grams are far from centered)."""
    X = torch.randn(m, 6, generator=rng, dtype=torch.float64)
    K1 = X @ X.T + 5.0
    K2 = K1 + 0.3 * torch.randn(m, m, generator=rng, dtype=torch.float64)
    if not symmetric:
        K1 = K1 + torch.randn(m, m, generator=rng, dtype=torch.float64)
    return K1.to(dtype), K2.to(dtype)


def _reference(K1, K2, centered):
    """float64 terms from the *same* (possibly rounded) input values."""
    K1, K2 = K1.double(), K2.double()
    if centered:
        H = torch.eye(K1.shape[0], dtype=torch.float64) - 1.0 / K1.shape[0]
        K1, K2 = H @ K1 @ H, H @ K2 @ H
    return (K1 * K2).sum(), (K1 * K1).sum(), (K2 * K2).sum()


def _assert_terms(actual, expected, scale, rtol=1e-12):
    """Each term within rtol of the summands' size Σ|x||y| (the float64 sums of float64 products)."""
    for got, want, size in zip(actual, expected, scale):
        assert got.dtype == torch.float64 and got.dim() == 0
        assert abs(got.item() - want.item()) <= rtol * size.item() + 1e-300, (got.item(), want.item())


def _entry_bound(K, centered):
    """|K|, or for HKH the bound |K_ij| + |r_i| + |c_j| + |μ| of each centered entry."""
    K = K.double()
    if not centered:
        return K.abs()
    return K.abs() + K.mean(dim=1, keepdim=True).abs() + K.mean(dim=0, keepdim=True).abs() + K.mean().abs()


def _scale(K1, K2, centered):
    return _reference(_entry_bound(K1, centered), _entry_bound(K2, centered), False)


# 1×1, one ragged tile, 2×2 ragged tiles (64-wide), float32 / bfloat16 / float64 Grams
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("m, dtype", [(1, torch.float32), (37, torch.float32), (100, torch.float32),
                                      (70, torch.bfloat16), (20, torch.float64)])
def test_terms_match_float64(m, dtype, centered, rng):
    K1, K2 = _grams(m, dtype, rng)
    _assert_terms(alignment_terms_triton(K1, K2, centered), _reference(K1, K2, centered), _scale(K1, K2, centered))


@pytest.mark.parametrize("centered", [False, True])
def test_non_symmetric_and_strided(centered, rng):
    """Row and column means differ for a non-symmetric Gram; a transposed view reads by strides."""
    K1, K2 = _grams(45, torch.float32, rng, symmetric=False)
    expected = _reference(K1.T, K2, centered)
    _assert_terms(alignment_terms_triton(K1.T, K2, centered), expected, _scale(K1.T, K2, centered))


@pytest.mark.parametrize("centered", [False, True])
def test_every_partial_written(centered, rng, monkeypatch):
    """NaN-poisoned scratch buffers: a program that skipped its slots would make the sums NaN."""
    monkeypatch.setattr(alignment_module, "scratch",
                        lambda shape, device: torch.full(shape, float("nan"), dtype=torch.float64, device=device))
    K1, K2 = _grams(100, torch.float32, rng, symmetric=False)
    _assert_terms(alignment_terms_triton(K1, K2, centered), _reference(K1, K2, centered), _scale(K1, K2, centered))


def test_kernel_alignment_of_identical_grams_is_one(rng):
    K1, _ = _grams(30, torch.float32, rng)
    cross, norm1, norm2 = alignment_terms(K1, K1, centered=True, backend="triton")
    assert abs((cross / (norm1 * norm2).sqrt()).item() - 1.0) < 1e-12


@pytest.mark.parametrize("n, d", [(30, 7), (9, 20)])  # the d < n route (‖R1ᵀR2‖²) and the n×n route
def test_representation_terms(n, d, rng):
    R1 = torch.randn(n, d, generator=rng)
    R2 = R1 + 0.5 * torch.randn(n, d, generator=rng)
    actual = representation_alignment_terms(R1, R2, backend="triton")
    R1, R2 = R1.double(), R2.double()
    expected = _reference(R1 @ R1.T, R2 @ R2.T, False)
    scale = _reference(R1.abs() @ R1.abs().T, R2.abs() @ R2.abs().T, False)
    _assert_terms(actual, expected, scale, rtol=1e-5)  # the Grams accumulate in float32


def test_public_dispatch_and_errors(rng):
    K1, K2 = _grams(12, torch.float32, rng)
    _assert_terms(alignment_terms(K1, K2, backend="triton"), alignment_terms_torch(K1, K2), _scale(K1, K2, False))
    with pytest.raises(ValueError, match="different shapes"):
        alignment_terms(K1, K2[:5, :5], backend="triton")
    with pytest.raises(ValueError, match="flatten"):
        alignment_terms_triton(K1.reshape(3, 4, 12), K2.reshape(3, 4, 12))
