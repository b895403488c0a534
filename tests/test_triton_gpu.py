"""The Triton kernels compiled for a CUDA device, each against a float64 torch reference on
shapes that are not multiples of the block sizes (tests/kernels runs the same kernels in
the CPU interpreter). ``bench/gpu_check.sh`` runs these with ``pytest -m gpu``.

FASTTANGENT_TEST_DEVICE=cpu with TRITON_INTERPRET=1 runs this file in the interpreter,
to check the file itself on a machine without a GPU."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fasttangent import kernels
from fasttangent.backends import triton_interpreting
from fasttangent.kernels.alignment import alignment_terms_torch
from fasttangent.kernels.factored_conv_gram import factored_conv_gram_torch
from fasttangent.kernels.factored_dense_gram import factored_dense_gram_torch
from fasttangent.kernels.sign_mask import count_sign_matches_torch, pack_signs_torch

DEVICE = os.environ.get("FASTTANGENT_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(DEVICE == "cuda" and triton_interpreting(),
                       reason="TRITON_INTERPRET is set (tests/kernels sets it): run this file on its own"),
]

# elementwise bound relative to the sum of |products| (float32 accumulation; bfloat16 inputs
# are compared with the float64 products of the same bfloat16 values)
TOLERANCE = 1e-5


def _randn(*shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


def _assert_close(actual, expected, scale):
    error = (actual.double() - expected).abs()
    assert torch.isfinite(actual).all()
    assert (error <= TOLERANCE * scale + 1e-30).all(), f"worst error {error.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n1, n2, p", [(1, 1, 5), (37, 21, 70), (130, 67, 301)])
def test_gram(n1, n2, p, dtype):
    J1, J2 = _randn(n1, p, dtype=dtype), _randn(n2, p, dtype=dtype, seed=1)
    for second in (None, J2):
        other = J1 if second is None else second
        K = kernels.gram(J1, second, backend="triton")
        _assert_close(K, J1.double() @ other.double().T, J1.double().abs() @ other.double().abs().T)
        if second is None:
            assert torch.equal(K, K.T), "a symmetric Gram is mirrored exactly"
    # accumulating into a given buffer
    out = torch.ones(n1, n2, device=DEVICE)
    kernels.gram(J1, J2, out=out, backend="triton")
    _assert_close(out, 1 + J1.double() @ J2.double().T, 1 + J1.double().abs() @ J2.double().abs().T)


@pytest.mark.parametrize("n1, n2, d_in, c, d_out", [(1, 1, 3, 1, 2), (19, 7, 21, 3, 18), (70, 33, 130, 2, 65)])
def test_factored_dense_gram(n1, n2, d_in, c, d_out):
    A1, G1 = _randn(n1, d_in), _randn(n1, c, d_out, seed=1)
    A2, G2 = _randn(n2, d_in, seed=2), _randn(n2, c, d_out, seed=3)
    K = kernels.factored_dense_gram(A1, G1, A2, G2, backend="triton")
    expected = factored_dense_gram_torch(A1.double(), G1.double(), A2.double(), G2.double())
    scale = factored_dense_gram_torch(A1.double().abs(), G1.double().abs(), A2.double().abs(), G2.double().abs())
    _assert_close(K, expected, scale)


@pytest.mark.parametrize("n1, n2, T, d_in, c, d_out", [(1, 1, 1, 1, 1, 1), (3, 2, 19, 7, 2, 5), (9, 5, 70, 27, 3, 34)])
def test_factored_conv_gram(n1, n2, T, d_in, c, d_out):
    A1, G1 = _randn(n1, T, d_in), _randn(n1, c, T, d_out, seed=1)
    A2, G2 = _randn(n2, T, d_in, seed=2), _randn(n2, c, T, d_out, seed=3)
    for second in ((None, None), (A2, G2)):
        K = kernels.factored_conv_gram(A1, G1, *second, backend="triton")
        doubled = [None if t is None else t.double() for t in second]
        absolute = [None if t is None else t.double().abs() for t in second]
        _assert_close(K, factored_conv_gram_torch(A1.double(), G1.double(), *doubled),
                      factored_conv_gram_torch(A1.double().abs(), G1.double().abs(), *absolute))


@pytest.mark.parametrize("numel", [1, 31, 33, 100_003])
def test_sign_masks(numel):
    x = _randn(numel)
    packed = kernels.pack_signs(x, backend="triton")
    assert torch.equal(packed.cpu(), pack_signs_torch(x.cpu()))
    live = x + 0.5 * _randn(numel, seed=1)
    count = kernels.count_sign_matches(live, packed, backend="triton")
    assert int(count) == int(count_sign_matches_torch(live.cpu(), packed.cpu()))


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("m", [1, 37, 300])
def test_alignment_terms(m, centered):
    K1 = _randn(m, m)
    K1 = K1 @ K1.T
    K2 = K1 + _randn(m, m, seed=1)
    terms = kernels.alignment_terms(K1, K2, centered=centered, backend="triton")
    for actual, expected in zip(terms, alignment_terms_torch(K1.double(), K2.double(), centered)):
        assert abs(actual.item() - expected.item()) <= 1e-5 * max(abs(expected.item()), 1e-12)
