"""The flash-attention-style factored conv Gram kernel, K[i, j] += Σ_k ⟨A_i A_jᵀ, G_ik G_jkᵀ⟩_F,
against the float64 composition that materializes every T1×T2 product."""
import importlib

import pytest
import torch

from fasttangent.kernels.factored_conv_gram import (factored_conv_gram, factored_conv_gram_torch,
                                                    factored_conv_gram_triton)

from .checks import assert_within, poisoned_buffer

F32, BF16 = torch.float32, torch.bfloat16
conv_module = importlib.import_module("fasttangent.kernels.factored_conv_gram")


def _reference(A1, G1, A2, G2):
    """(K, bound scale) in float64: Σ_{t,s} |a·a'| |Σ_k g·g'| bounds the summands."""
    A2, G2 = (A1, G1) if A2 is None else (A2, G2)
    A1, G1, A2, G2 = (t.double() for t in (A1, G1, A2, G2))
    K = torch.einsum("itd,jsd,ikte,jkse->ij", A1, A2, G1, G2)
    AA = torch.einsum("itd,jsd->ijts", A1.abs(), A2.abs())
    GG = torch.einsum("iktd,jksd->ijts", G1.abs(), G2.abs())
    return K, (AA * GG).sum(dim=(2, 3))


def _factors(n1, n2, T1, T2, d_in, c, d_out, dtype, rng):
    def draw(*shape):
        return torch.randn(*shape, generator=rng).to(dtype)
    A1, G1 = draw(n1, T1, d_in), draw(n1, c, T1, d_out)
    if n2 is None:
        return A1, G1, None, None
    return A1, G1, draw(n2, T2, d_in), draw(n2, c, T2, d_out)


# T and d off the block sizes (powers of two up to 64 positions and 32 features):
# T1 = 70 spans two position blocks and d_out = 34 two feature blocks
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n1, n2, T1, T2, d_in, c, d_out", [
    (3, None, 19, 19, 7, 2, 5),
    (3, 2, 19, 9, 7, 2, 5),
    (1, None, 1, 1, 1, 1, 1),
    (2, 1, 70, 5, 3, 1, 34),
])
def test_matches_float64_composition(n1, n2, T1, T2, d_in, c, d_out, dtype, rng):
    factors = _factors(n1, n2, T1, T2, d_in, c, d_out, dtype, rng)
    assert_within(factored_conv_gram_triton(*factors), *_reference(*factors), dtype)


@pytest.mark.parametrize("n2", [None, 3])
def test_every_element_written(n2, rng, monkeypatch):
    buffers = poisoned_buffer(monkeypatch, conv_module)
    factors = _factors(4, n2, 6, 11, 3, 2, 4, F32, rng)
    K = factored_conv_gram_triton(*factors)
    assert K is buffers[0]
    assert_within(K, *_reference(*factors), F32)
    if n2 is None:
        assert torch.equal(K, K.T)


def test_accumulates_into_prefilled_out(rng):
    factors = _factors(3, 4, 9, 6, 5, 2, 3, F32, rng)
    start = torch.randn(3, 4, generator=rng)
    out = start.clone()
    assert factored_conv_gram_triton(*factors, out=out) is out
    expected, scale = _reference(*factors)
    assert_within(out, expected + start.double(), scale + start.abs(), F32)


def test_strided_inputs(rng):
    """Unfolded patches usually arrive as (n, d_in, T) transposed views."""
    A1 = torch.randn(3, 5, 12, generator=rng).transpose(1, 2)  # (3, 12, 5)
    G1 = torch.randn(3, 2, 4, 12, generator=rng).transpose(2, 3)  # (3, 2, 12, 4)
    assert_within(factored_conv_gram_triton(A1, G1), *_reference(A1, G1, None, None), F32)


def test_public_dispatch_and_errors(rng):
    factors = _factors(2, 3, 7, 5, 3, 2, 4, F32, rng)
    assert_within(factored_conv_gram(*factors, backend="triton"), *_reference(*factors), F32)
    assert torch.equal(factored_conv_gram(*factors, backend="torch"), factored_conv_gram_torch(*factors))
    A1, G1, A2, G2 = factors
    with pytest.raises(ValueError, match="both A2 and G2"):
        factored_conv_gram(A1, G1, None, G2, backend="triton")
    with pytest.raises(ValueError, match="inconsistent shapes"):
        factored_conv_gram_triton(A1, G1, A2, G2[:, :, :2])
