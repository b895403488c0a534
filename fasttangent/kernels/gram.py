"""Blocked Gram product K (+)= J1 J2ᵀ; symmetric when J2 is None.

J1: (n1, p), J2: (n2, p) -> out: (n1, n2). Streaming parameter chunks into the same
``out`` accumulates the Gram of all of them.

The Triton kernel launches one program per output tile; for the symmetric Gram only the
tiles (I, J) with I <= J exist (half the FLOPs of ``torch.mm``), and every entry above
the diagonal is stored at (i, j) and mirrored at (j, i), so K is exactly symmetric. When
the tiles alone cannot fill the GPU (small n, long p: the usual Jacobian shape), the p
axis is split across programs that add their partial tiles atomically.
"""
from __future__ import annotations

import torch

from ..backends import resolve
from ._triton import (check_launchable, dot_block, dot_precision, finish, jit, output_buffer, pick_backend, store_tile,
                      tile_grid, tile_of_program, tl, triton, upcast_for_dot)


def gram_torch(J1: torch.Tensor, J2: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: J1 J2ᵀ with fp32-or-better accumulation."""
    acc = torch.promote_types(J1.dtype, torch.float32)
    J2 = J1 if J2 is None else J2
    return J1.to(acc) @ J2.to(acc).T


# The torch path of the symmetric Gram computes, per band of this many rows, only the part
# on and right of the diagonal block, then mirrors it: from n = 2 bands on this saves a
# quarter (n = 256) to nearly half (large n) of the products, measured 1.1-1.9x on 2 cores.
SYMMETRIC_BAND_ROWS = 128


def symmetric_gram_torch(J: torch.Tensor) -> torch.Tensor:
    """J Jᵀ (n, n) from the products of row bands: band a gives rows a of columns ≥ a (its
    diagonal block and the blocks right of it), and the blocks left of the diagonal are
    mirrored. The band is n/4 rows, at least ``SYMMETRIC_BAND_ROWS`` (one band below 256
    rows). Exactly symmetric."""
    acc = torch.promote_types(J.dtype, torch.float32)
    J = J.to(acc)
    n = J.shape[0]
    band = max(SYMMETRIC_BAND_ROWS, n // 4)
    K = J.new_empty((n, n))
    for start in range(0, n, band):
        stop = min(start + band, n)
        K[start:stop, start:] = J[start:stop] @ J[start:].T
        # a matmul's own diagonal block is symmetric only up to rounding: average it
        diagonal = K[start:stop, start:stop]
        diagonal.copy_((diagonal + diagonal.T) / 2)
        K[stop:, start:stop] = K[start:stop, stop:].T
    return K


@jit
def _gram_kernel(j1_ptr, j2_ptr, out_ptr, pairs_ptr, n1, n2, p, k_per_split,
                 stride_1m, stride_1k, stride_2m, stride_2k, stride_om, stride_on,
                 SYMMETRIC: tl.constexpr, ACCUMULATE: tl.constexpr, ATOMIC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """out[I, J] (+)= Σ_k J1[I, k] J2[J, k] for the tile (I, J) of program 0 and the p range of program 1."""
    tile_m, tile_n = tile_of_program(pairs_ptr, n2, BLOCK_N, SYMMETRIC)
    # int64 offsets: a Jacobian chunk easily has more than 2**31 elements
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, p)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        in_k = ks[None, :] < k_end
        a = tl.load(j1_ptr + rows[:, None] * stride_1m + ks[None, :] * stride_1k,
                    mask=(rows[:, None] < n1) & in_k, other=0.0)
        b = tl.load(j2_ptr + cols[:, None] * stride_2m + ks[None, :] * stride_2k,
                    mask=(cols[:, None] < n2) & in_k, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
    store_tile(out_ptr, stride_om, stride_on, rows, cols, acc, n1, n2, SYMMETRIC, ACCUMULATE, ATOMIC)


def _launch_shape(n1: int, n2: int, p: int, dtype: torch.dtype, symmetric: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): 64- or 128-wide tiles on a GPU-sized problem,
    the smallest legal tile (16) when n is tiny so the padding stays cheap. A symmetric
    Gram needs square tiles so that tile (I, J) mirrors onto tile (J, I)."""
    block_m = dot_block(n1, largest=128 if n1 >= 1024 else 64)
    block_n = dot_block(n2, largest=128 if n2 >= 1024 else 64)
    if symmetric:
        block_n = block_m
    block_k = dot_block(p, largest=32 if dtype == torch.float32 else 64)
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return block_m, block_n, block_k, num_warps


def _split_count(programs: int, p: int, block_k: int, device: torch.device) -> int:
    """How many p ranges to split into so that about two programs run per SM (1 in the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    k_blocks = -(-p // block_k)
    # keep at least 8 K steps per program so the pipelining has something to overlap
    return max(1, min((2 * sms) // max(programs, 1), k_blocks // 8))


def gram_triton(J1: torch.Tensor, J2: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                allow_tf32: bool = False, split_k: int | None = None) -> torch.Tensor:
    """Host wrapper of the Triton kernel: returns J1 J2ᵀ (float32), or adds it into ``out``.

    ``split_k`` forces the number of p ranges (default: enough programs to fill the GPU).
    """
    symmetric = J2 is None
    J2_ = J1 if symmetric else J2
    if J1.dim() != 2 or J2_.dim() != 2 or J1.shape[1] != J2_.shape[1]:
        raise ValueError(f"gram expects J1 (n1, p) and J2 (n2, p), got {tuple(J1.shape)} and {tuple(J2_.shape)}")
    if J1.dtype != J2_.dtype:  # tl.dot needs one operand dtype
        J1, J2_ = J1.float(), J2_.float()
    n1, p = J1.shape
    n2 = J2_.shape[0]
    buffer, accumulate = output_buffer(out, (n1, n2), J1.device)
    if n1 == 0 or n2 == 0:
        return finish(out, buffer.zero_() if not accumulate else buffer)
    check_launchable(_gram_kernel, "gram")
    block_m, block_n, block_k, num_warps = _launch_shape(n1, n2, p, J1.dtype, symmetric)
    pairs, programs = tile_grid(n1, n2, block_m, block_n, symmetric, J1.device, buffer)
    split = split_k or _split_count(programs, p, block_k, J1.device)
    k_per_split = triton.cdiv(triton.cdiv(p, split), block_k) * block_k if p else block_k
    split = max(1, triton.cdiv(p, k_per_split))
    atomic = split > 1
    if atomic and not accumulate:
        buffer.zero_()  # partial tiles are added atomically, so start from zero
    _gram_kernel[(programs, split)](
        J1, J2_, buffer, pairs, n1, n2, p, k_per_split,
        J1.stride(0), J1.stride(1), J2_.stride(0), J2_.stride(1), buffer.stride(0), buffer.stride(1),
        SYMMETRIC=symmetric, ACCUMULATE=accumulate or atomic, ATOMIC=atomic,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        INPUT_PRECISION=dot_precision(J1.dtype, allow_tf32), UPCAST=upcast_for_dot(J1.dtype),
        num_warps=num_warps, num_stages=3)
    return finish(out, buffer)


def gram_cuda_dispatch(J1: torch.Tensor, J2: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """Run ``fasttangent.cuda_ops.gram_cuda``, adapting what it does not take: it reads rows with
    contiguous columns of one dtype and writes a float32 ``out`` with contiguous rows."""
    from ..cuda_ops import gram_cuda

    if J2 is not None and J1.dtype != J2.dtype:
        J1, J2 = J1.float(), J2.float()
    J1 = J1 if J1.stride(1) == 1 else J1.contiguous()
    J2 = J2 if J2 is None or J2.stride(1) == 1 else J2.contiguous()
    if out is None or (out.dtype == torch.float32 and out.stride(1) == 1):
        return gram_cuda(J1, J2, out)
    out += gram_cuda(J1, J2).to(out.dtype)
    return out


def gram(J1: torch.Tensor, J2: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
         backend: str = "auto", allow_tf32: bool = False) -> torch.Tensor:
    """K = J1 J2ᵀ, added into ``out`` when given (then ``out`` is returned).

    J1 (n1, p), J2 (n2, p) or None for the symmetric J1 J1ᵀ. Returns (n1, n2).
    ``allow_tf32`` lets the Triton kernel multiply float32 inputs in TF32 (about 10 mantissa
    bits, several times faster); the torch path follows ``torch.backends.cuda.matmul.allow_tf32``.
    """
    tensors = (J1,) if J2 is None else (J1, J2)
    # Triton first: it splits long p over programs when the tiles alone leave SMs idle, and uses
    # tensor cores for 16-bit inputs; the CUDA kernel (float32 FMA tiles) is the fallback.
    chosen = resolve(backend, *tensors, supports=("torch", "triton", "cuda"), prefer=("triton", "cuda", "torch"),
                     op="gram")
    chosen = pick_backend(chosen, backend, tensors, "gram")
    if chosen == "cuda":
        return gram_cuda_dispatch(J1, J2, out)
    if chosen == "triton":
        return gram_triton(J1, J2, out=out, allow_tf32=allow_tf32)
    return finish(out, gram_torch(J1, J2) if J2 is not None else symmetric_gram_torch(J1))
