"""The fused factored dense-layer Gram kernel, K += (A1 A2ᵀ) ⊙ Σ_k G1_k G2_kᵀ, against float64."""
import importlib

import pytest
import torch

from fasttangent.kernels.factored_dense_gram import (factored_dense_gram, factored_dense_gram_torch,
                                                     factored_dense_gram_triton)

from .checks import assert_within, poisoned_buffer

F32, BF16 = torch.float32, torch.bfloat16
dense_module = importlib.import_module("fasttangent.kernels.factored_dense_gram")


def _reference(A1, G1, A2, G2):
    """(K, bound scale) in float64: the composition and the same with absolute values."""
    A2, G2 = (A1, G1) if A2 is None else (A2, G2)
    A1, G1, A2, G2 = (t.double() for t in (A1, G1, A2, G2))
    K = (A1 @ A2.T) * torch.einsum("ikd,jkd->ij", G1, G2)
    scale = (A1.abs() @ A2.abs().T) * torch.einsum("ikd,jkd->ij", G1.abs(), G2.abs())
    return K, scale


def _factors(n1, n2, d_in, c, d_out, dtype, rng):
    def draw(*shape):
        return torch.randn(*shape, generator=rng).to(dtype)
    A1, G1 = draw(n1, d_in), draw(n1, c, d_out)
    if n2 is None:
        return A1, G1, None, None
    return A1, G1, draw(n2, d_in), draw(n2, c, d_out)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n1, n2, d_in, c, d_out", [(19, None, 21, 3, 18), (19, 7, 21, 3, 18), (1, None, 3, 1, 2),
                                                    (1, 2, 40, 2, 5)])
def test_matches_float64_composition(n1, n2, d_in, c, d_out, dtype, rng):
    factors = _factors(n1, n2, d_in, c, d_out, dtype, rng)
    assert_within(factored_dense_gram_triton(*factors), *_reference(*factors), dtype)


@pytest.mark.parametrize("n2", [None, 9])
def test_every_element_written(n2, rng, monkeypatch):
    buffers = poisoned_buffer(monkeypatch, dense_module)
    factors = _factors(35, n2, 6, 2, 7, F32, rng)
    K = factored_dense_gram_triton(*factors)
    assert K is buffers[0]
    assert_within(K, *_reference(*factors), F32)
    if n2 is None:
        assert torch.equal(K, K.T)


def test_accumulates_into_prefilled_out(rng):
    factors = _factors(18, 12, 5, 2, 9, F32, rng)
    start = torch.randn(18, 12, generator=rng)
    out = start.clone()
    assert factored_dense_gram_triton(*factors, out=out) is out
    expected, scale = _reference(*factors)
    assert_within(out, expected + start.double(), scale + start.abs(), F32)


def test_strided_and_mixed_dtype_inputs(rng):
    """G as a transposed view (c, d strides swapped) and A in bfloat16 with G in float32."""
    A1 = torch.randn(13, 10, generator=rng).to(BF16)
    G1 = torch.randn(13, 6, 3, generator=rng).transpose(1, 2)  # (13, 3, 6), non-contiguous
    assert not G1.is_contiguous()
    assert_within(factored_dense_gram_triton(A1, G1), *_reference(A1, G1, None, None), F32)


def test_public_dispatch_and_errors(rng):
    factors = _factors(9, 4, 5, 2, 3, F32, rng)
    assert_within(factored_dense_gram(*factors, backend="triton"), *_reference(*factors), F32)
    assert torch.equal(factored_dense_gram(*factors, backend="torch"), factored_dense_gram_torch(*factors))
    A1, G1, A2, G2 = factors
    with pytest.raises(ValueError, match="both A2 and G2"):
        factored_dense_gram(A1, G1, A2, None, backend="triton")
    with pytest.raises(ValueError, match="inconsistent shapes"):
        factored_dense_gram_triton(A1, G1, A2[:, :3], G2)
