"""The Triton Gram kernel against float64 products: symmetric (upper tiles + mirror) and
cross, split-p atomics, accumulation, strided chunks, poisoned outputs, dispatch."""
import importlib

import pytest
import torch

from fasttangent.kernels.gram import gram, gram_torch, gram_triton

from .checks import assert_within, poisoned_buffer

# the package re-exports the function ``gram`` under the submodule's name
gram_module = importlib.import_module("fasttangent.kernels.gram")

F32, BF16 = torch.float32, torch.bfloat16


def _reference(J1, J2):
    """(J1 J2ᵀ, |J1| |J2|ᵀ) in float64 from the exact input values."""
    J2 = J1 if J2 is None else J2
    J1, J2 = J1.double(), J2.double()
    return J1 @ J2.T, J1.abs() @ J2.abs().T


def _jacobians(n1, n2, p, dtype, rng):
    J1 = torch.randn(n1, p, generator=rng).to(dtype)
    J2 = None if n2 is None else torch.randn(n2, p, generator=rng).to(dtype)
    return J1, J2


# shapes off the block sizes (16/32/64), n = 1, and a cross Gram with n1 != n2
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n1, n2, p", [(37, None, 50), (21, 13, 70), (1, None, 5), (1, 3, 17)])
def test_matches_float64_products(n1, n2, p, dtype, rng):
    J1, J2 = _jacobians(n1, n2, p, dtype, rng)
    K = gram_triton(J1, J2)
    assert K.dtype == torch.float32
    assert_within(K, *_reference(J1, J2), dtype)


@pytest.mark.parametrize("n2", [None, 19])
def test_split_p_atomics(n2, rng):
    """p split over 3 programs per tile, partial tiles added atomically into zero / into out."""
    J1, J2 = _jacobians(33, n2, 150, F32, rng)
    expected, scale = _reference(J1, J2)
    assert_within(gram_triton(J1, J2, split_k=3), expected, scale, F32)
    out = torch.full(expected.shape, -2.0)
    gram_triton(J1, J2, out=out, split_k=3)
    assert_within(out, expected - 2.0, scale + 2.0, F32)


def test_symmetric_gram_is_exactly_symmetric(rng):
    J1, _ = _jacobians(45, None, 40, F32, rng)
    K = gram_triton(J1)
    assert torch.equal(K, K.T)


@pytest.mark.parametrize("n1, n2", [(37, None), (20, 35)])
def test_every_element_written(n1, n2, rng, monkeypatch):
    """A NaN-poisoned result buffer is fully overwritten: the mirrored half included."""
    buffers = poisoned_buffer(monkeypatch, gram_module)
    J1, J2 = _jacobians(n1, n2, 20, F32, rng)
    K = gram_triton(J1, J2)
    assert K is buffers[0]
    assert_within(K, *_reference(J1, J2), F32)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_streamed_chunks_accumulate_into_prefilled_out(out_dtype, rng):
    """Column chunks (strided views) streamed into one pre-filled ``out`` add up to the Gram."""
    J1, _ = _jacobians(26, None, 90, F32, rng)
    J2, _ = _jacobians(11, None, 90, F32, rng)
    start = torch.randn(26, 11, generator=rng).to(out_dtype)
    out = start.clone()
    for lo, hi in [(0, 37), (37, 38), (38, 90)]:
        result = gram_triton(J1[:, lo:hi], J2[:, lo:hi], out=out)
        assert result is out
    expected, scale = _reference(J1, J2)
    if out_dtype == torch.bfloat16:  # the sum is rounded to bfloat16 once per chunk
        tolerance = 3 * 2 ** -8 * (expected.abs() + start.double().abs() + scale)
        assert ((out.double() - start.double() - expected).abs() <= tolerance).all()
    else:
        assert_within(out - start, expected, scale + start.abs(), F32)


def test_transposed_operands(rng):
    """Strides, not contiguity, drive the loads (the representation route passes Rᵀ)."""
    R1 = torch.randn(40, 9, generator=rng)
    R2 = torch.randn(40, 6, generator=rng)
    assert_within(gram_triton(R1.T, R2.T), *_reference(R1.T, R2.T), F32)


def test_tf32_option_runs(rng):
    """allow_tf32 only changes the GPU multiply precision (the interpreter multiplies in float32)."""
    J1, J2 = _jacobians(18, 7, 30, F32, rng)
    expected, scale = _reference(J1, J2)
    assert_within(gram_triton(J1, J2, allow_tf32=True), expected, scale, F32)


def test_public_dispatch(rng):
    J1, J2 = _jacobians(17, 5, 23, F32, rng)
    assert_within(gram(J1, J2, backend="triton"), *_reference(J1, J2), F32)
    assert torch.equal(gram(J1, J2, backend="torch"), gram_torch(J1, J2))
    out = torch.ones(17, 17)
    assert gram(J1, out=out, backend="triton") is out
    with pytest.raises(ValueError, match="float64"):
        gram(J1.double(), backend="triton")
    with pytest.raises(ValueError, match="shape"):
        gram(J1, J2, out=torch.zeros(3, 3), backend="triton")


@pytest.mark.parametrize("dtype", [F32, torch.float64])
@pytest.mark.parametrize("n", [255, 300, 1030])
def test_torch_symmetric_gram_in_row_bands(n, dtype, rng):
    """The torch path's banded symmetric product (bands of n/4, at least 128 rows, ragged
    last band) against float64, exactly symmetric, and accumulated into ``out``."""
    from fasttangent.kernels.gram import symmetric_gram_torch
    J = torch.randn(n, 40, generator=rng).to(dtype)
    K = symmetric_gram_torch(J)
    assert torch.equal(K, K.T)
    assert_within(K, *_reference(J, None), dtype)
    out = torch.ones(n, n, dtype=dtype)
    gram(J, out=out, backend="torch")
    assert_within(out - 1, *_reference(J, None), dtype)
