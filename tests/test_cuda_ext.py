"""The compiled extension fasttangent._C (csrc/) and its wrappers in fasttangent.cuda_ops.

On CPU machines: the extension imports when it was built, exposes its functions, and
the wrappers reject CPU tensors (or a missing extension) with messages naming the fix.
On CUDA machines (marker ``gpu``): every kernel against the torch references in
fasttangent.kernels and float64 products, on odd shapes, misaligned views and
poisoned memory.
"""
import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from fasttangent import cuda_ops
from fasttangent.backends import cuda_extension
from fasttangent.kernels.gram import gram_torch
from fasttangent.kernels.sign_mask import count_sign_matches_torch, pack_signs_torch

BUILT = importlib.util.find_spec("fasttangent._C") is not None
needs_built = pytest.mark.skipif(not BUILT, reason="fasttangent._C was not built here (no nvcc or no CUDA torch at "
                                                   "install time, or FASTTANGENT_BUILD_CUDA=0)")
gpu = [pytest.mark.gpu,
       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
       pytest.mark.skipif(not BUILT, reason="fasttangent._C was not built; install with FASTTANGENT_BUILD_CUDA=1")]


def _gpu(test):
    for mark in gpu:
        test = mark(test)
    return test


# ---------------------------------------------------------------- CPU-side checks

@needs_built
def test_extension_imports_and_exposes_kernels():
    try:  # a failure here (missing CUDA libraries, a build for another torch) must not be skipped
        import fasttangent._C as ext
    except ImportError as error:
        pytest.fail(f"fasttangent._C was built but does not import ({error}); rebuild it with "
                    "FASTTANGENT_BUILD_CUDA=1 pip install --no-build-isolation -e . or delete the stale "
                    "fasttangent/_C*.so")
    assert cuda_extension() is ext
    for name in ("gram", "pack_signs", "count_sign_matches"):
        assert callable(getattr(ext, name)), name


@needs_built
def test_extension_imports_in_a_fresh_interpreter_before_torch():
    # its rpath must find libc10/libcudart without `import torch` first, and no GPU driver is needed
    result = subprocess.run([sys.executable, "-c", "import fasttangent._C"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


@needs_built
@pytest.mark.parametrize("call", [
    lambda: cuda_ops.gram_cuda(torch.ones(3, 4)),
    lambda: cuda_ops.gram_cuda(torch.ones(3, 4), torch.ones(2, 4)),
    lambda: cuda_ops.pack_signs_cuda(torch.ones(40)),
    lambda: cuda_ops.count_sign_matches_cuda(torch.ones(40), torch.zeros(2, dtype=torch.int32)),
], ids=["gram", "cross_gram", "pack_signs", "count_sign_matches"])
def test_wrappers_reject_cpu_tensors_with_the_fix(call):
    with pytest.raises(ValueError, match=r"is on cpu but the CUDA kernel needs a CUDA tensor; move it with .*\.cuda\(\)"):
        call()


def test_missing_extension_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(cuda_ops, "cuda_extension", lambda: None)
    monkeypatch.setitem(sys.modules, "fasttangent._C", None)  # makes the import fail like an absent build
    for call in (lambda: cuda_ops.gram_cuda(torch.ones(2, 2)), lambda: cuda_ops.pack_signs_cuda(torch.ones(3)),
                 lambda: cuda_ops.count_sign_matches_cuda(torch.ones(3), torch.zeros(1, dtype=torch.int32))):
        with pytest.raises(RuntimeError, match=r"fasttangent\._C is not available .*FASTTANGENT_BUILD_CUDA=1"):
            call()


# ---------------------------------------------------------------- GPU numerics

def _signed_values(shape, dtype, seed):
    """Normal values with exact zeros and -0.0 mixed in (status is strictly x > 0)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda")
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::11] = -0.0
    return x.to(dtype)


SIGN_SIZES = [1, 5, 31, 32, 33, 127, 128, 129, 255, 256, 257, 1000, 4096 * 3 + 17, (3, 7, 129), (1 << 20) + 5]
SIGN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@_gpu
@pytest.mark.parametrize("dtype", SIGN_DTYPES)
@pytest.mark.parametrize("shape", SIGN_SIZES)
def test_pack_signs_matches_reference(shape, dtype):
    x = _signed_values(shape, dtype, seed=1)
    packed = cuda_ops.pack_signs_cuda(x)
    assert packed.dtype == torch.int32 and packed.shape == (math.ceil(x.numel() / 32),)
    torch.testing.assert_close(packed, pack_signs_torch(x), rtol=0, atol=0)


@_gpu
@pytest.mark.parametrize("dtype", SIGN_DTYPES)
def test_pack_signs_on_misaligned_and_strided_views(dtype):
    base = _signed_values(4099, dtype, seed=2)
    shifted = base[1:]  # storage offset 1: not 16-byte aligned, takes the scalar path
    torch.testing.assert_close(cuda_ops.pack_signs_cuda(shifted), pack_signs_torch(shifted), rtol=0, atol=0)
    transposed = _signed_values((65, 97), dtype, seed=3).T  # non-contiguous: flat order of reshape(-1)
    torch.testing.assert_close(cuda_ops.pack_signs_cuda(transposed), pack_signs_torch(transposed), rtol=0, atol=0)


@_gpu
def test_pack_signs_of_empty_tensor():
    assert cuda_ops.pack_signs_cuda(torch.empty(0, device="cuda")).shape == (0,)


@_gpu
@pytest.mark.parametrize("dtype", SIGN_DTYPES)
@pytest.mark.parametrize("shape", SIGN_SIZES)
def test_count_sign_matches_matches_reference(shape, dtype):
    reference = _signed_values(shape, dtype, seed=4)
    live = reference.clone()
    flat = live.view(-1)
    flips = torch.rand(flat.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)) < 0.3
    flat[flips] = -flat[flips] + (flat[flips] == 0).to(dtype)  # flip signs; a zero becomes on
    packed = pack_signs_torch(reference)
    expected = count_sign_matches_torch(live, packed)
    got = cuda_ops.count_sign_matches_cuda(live, packed)
    assert got.dtype == torch.int64 and got.dim() == 0
    assert got.item() == expected.item()
    assert cuda_ops.count_sign_matches_cuda(reference, packed).item() == reference.numel()


@_gpu
def test_count_sign_matches_ignores_padding_bits_and_handles_misalignment():
    x = _signed_values(1000, torch.float32, seed=6)[3:]  # 997 elements: 5 padding bits in the last word
    packed = pack_signs_torch(x)
    packed[-1] |= torch.tensor(-(1 << 5), dtype=torch.int32, device="cuda")  # set every padding bit
    assert cuda_ops.count_sign_matches_cuda(x, packed).item() == count_sign_matches_torch(x, packed).item() == 997


@_gpu
def test_sign_kernels_reject_bad_inputs_with_the_fix():
    x = torch.randn(100, device="cuda")
    with pytest.raises(TypeError, match=r"float32, bfloat16 or float16; convert it"):
        cuda_ops.pack_signs_cuda(x.double())
    with pytest.raises(ValueError, match=r"packed has 3 words but x has 100 elements \(4 words\)"):
        cuda_ops.count_sign_matches_cuda(x, torch.zeros(3, dtype=torch.int32, device="cuda"))
    with pytest.raises(TypeError, match=r"must be int32 .* packed\.int\(\)"):
        cuda_ops.count_sign_matches_cuda(x, torch.zeros(4, dtype=torch.int64, device="cuda"))


def _poisoned_alloc(numel):
    """Leave NaNs in the caching allocator's next block, so unwritten outputs show."""
    poison = torch.full((numel + 4096,), float("nan"), device="cuda")
    del poison


def _gram64(J1, J2=None):
    J2 = J1 if J2 is None else J2
    return J1.double() @ J2.double().T


def _assert_gram_close(K, J1, J2=None):
    ref = _gram64(J1, J2)
    # fp32 accumulation over p terms: error grows like sqrt(p) eps |J1||J2|
    scale = (J1.double().norm(dim=1, keepdim=True) * (J1 if J2 is None else J2).double().norm(dim=1)).clamp_min(1e-30)
    err = (K.double() - ref).abs() / scale
    assert err.max().item() < 1e-5, err.max().item()
    # the torch reference may run in TF32 if a caller enabled it, hence the looser bound
    torch.testing.assert_close(K, gram_torch(J1, J2), rtol=2e-3, atol=2e-3 * scale.max().item())


GRAM_SHAPES = [(1, 1), (1, 37), (5, 3), (127, 8), (128, 13), (129, 64), (300, 1000), (257, 4099)]


@_gpu
@pytest.mark.parametrize("n,p", GRAM_SHAPES)
def test_symmetric_gram_matches_float64_and_is_exactly_symmetric(n, p):
    J = torch.randn(n, p, device="cuda")
    _poisoned_alloc(n * n)
    K = cuda_ops.gram_cuda(J)
    assert K.shape == (n, n) and K.dtype == torch.float32
    assert torch.isfinite(K).all(), "some output entries were never written"
    assert torch.equal(K, K.T)
    _assert_gram_close(K, J)


@_gpu
@pytest.mark.parametrize("n1,n2,p", [(1, 1, 5), (1, 200, 33), (70, 200, 257), (200, 70, 8), (129, 385, 1001)])
def test_cross_gram_matches_float64(n1, n2, p):
    J1, J2 = torch.randn(n1, p, device="cuda"), torch.randn(n2, p, device="cuda")
    _poisoned_alloc(n1 * n2)
    K = cuda_ops.gram_cuda(J1, J2)
    assert K.shape == (n1, n2)
    assert torch.isfinite(K).all(), "some output entries were never written"
    _assert_gram_close(K, J1, J2)


@_gpu
@pytest.mark.parametrize("symmetric", [True, False])
def test_gram_streams_misaligned_parameter_chunks_into_out(symmetric):
    n1, n2, p = 150, 90, 1003
    J1 = torch.randn(n1, p, device="cuda")
    J2 = None if symmetric else torch.randn(n2, p, device="cuda")
    start = torch.randn(n1, n1 if symmetric else n2, device="cuda")
    out = start.clone()
    for lo, hi in [(0, 1), (1, 400), (400, 403), (403, p)]:  # odd offsets: scalar loads
        cuda_ops.gram_cuda(J1[:, lo:hi], None if symmetric else J2[:, lo:hi], out=out)
    torch.testing.assert_close(out.double(), start.double() + _gram64(J1, J2), rtol=1e-5, atol=1e-3)


@_gpu
@pytest.mark.parametrize("symmetric", [True, False])
def test_gram_with_few_tiles_splits_long_p_and_sums_in_order(symmetric):
    # n << p: the kernel splits p over blocks into a workspace, then sums the splits into out
    n1, n2, p = 64, 40, 200_003
    J1 = torch.randn(n1, p, device="cuda")
    J2 = None if symmetric else torch.randn(n2, p, device="cuda")
    K = cuda_ops.gram_cuda(J1, J2)
    _assert_gram_close(K, J1, J2)
    if symmetric:
        assert torch.equal(K, K.T)
    assert torch.equal(cuda_ops.gram_cuda(J1, J2), K), "split sums must be deterministic"
    big = torch.ones(n1 + 3, K.shape[1] + 5, device="cuda")
    view = (slice(1, 1 + n1), slice(2, 2 + K.shape[1]))
    cuda_ops.gram_cuda(J1, J2, out=big[view])  # misaligned rows with a stride: scalar accumulation
    torch.testing.assert_close(big[view], K + 1, rtol=1e-6, atol=1e-3)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[view] = False
    assert torch.all(big[outside] == 1), "entries outside out's view were written"


@_gpu
def test_gram_writes_only_its_view_of_a_larger_out():
    J1, J2 = torch.randn(40, 20, device="cuda"), torch.randn(30, 20, device="cuda")
    big = torch.zeros(40, 37, device="cuda")
    cuda_ops.gram_cuda(J1, J2, out=big[:, 3:33])
    torch.testing.assert_close(big[:, 3:33].double(), _gram64(J1, J2), rtol=1e-5, atol=1e-4)
    assert big[:, :3].abs().sum().item() == 0 and big[:, 33:].abs().sum().item() == 0


@_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gram_of_16bit_inputs_accumulates_in_float32(dtype, symmetric):
    J1 = torch.randn(133, 517, device="cuda").to(dtype)
    J2 = None if symmetric else torch.randn(77, 517, device="cuda").to(dtype)
    K = cuda_ops.gram_cuda(J1, J2)
    assert K.dtype == torch.float32
    _assert_gram_close(K, J1, J2)  # exact products of the 16-bit values, fp32 sums


@_gpu
def test_gram_with_no_parameters_is_zero_and_leaves_out_unchanged():
    assert torch.equal(cuda_ops.gram_cuda(torch.empty(6, 0, device="cuda")), torch.zeros(6, 6, device="cuda"))
    out = torch.randn(4, 3, device="cuda")
    before = out.clone()
    cuda_ops.gram_cuda(torch.empty(4, 0, device="cuda"), torch.empty(3, 0, device="cuda"), out=out)
    assert torch.equal(out, before)


@_gpu
def test_gram_rejects_bad_inputs_with_the_fix():
    J = torch.randn(8, 5, device="cuda")
    with pytest.raises(ValueError, match=r"J1 has 5 columns but J2 has 6"):
        cuda_ops.gram_cuda(J, torch.randn(3, 6, device="cuda"))
    with pytest.raises(TypeError, match=r"J1 has dtype Float but J2 has Half"):
        cuda_ops.gram_cuda(J, J.half())
    with pytest.raises(TypeError, match=r"pass a float32 out"):
        cuda_ops.gram_cuda(J, out=torch.zeros(8, 8, device="cuda", dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out has shape \[8, 7\] but J1 J2ᵀ has shape \[8, 8\]"):
        cuda_ops.gram_cuda(J, out=torch.zeros(8, 7, device="cuda"))
    with pytest.raises(ValueError, match=r"contiguous rows .*\.contiguous\(\)"):
        cuda_ops.gram_cuda(torch.randn(5, 8, device="cuda").T)
    with pytest.raises(TypeError, match=r"convert it \(J1\.float\(\)\) or use backend='torch'"):
        cuda_ops.gram_cuda(J.double())
