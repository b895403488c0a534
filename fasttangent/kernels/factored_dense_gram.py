"""Fused factored Gram of a dense layer.

For y = W a + b, the per-example gradient of output k is g_k aᵀ, so
K[i, j] += (a_i · a'_j) Σ_k (g_ik · g'_jk).

A1: (n1, d_in), G1: (n1, c, d_out), A2: (n2, d_in), G2: (n2, c, d_out) -> (n1, n2).

The Triton kernel computes, per output tile, both factors in registers (one ``tl.dot``
loop over d_in, one over (k, d_out)) and adds their elementwise product into ``out``:
neither n1×n2 factor is ever written to memory. Symmetric Grams use upper-triangle tiles
and mirror, as in ``gram``.
"""
from __future__ import annotations

import torch

from ..backends import resolve
from ._triton import (block_product, check_launchable, dot_block, dot_precision, finish, jit, output_buffer, pick_backend,
                      store_tile, tile_grid, tile_of_program, tl, upcast_for_dot)


def factored_dense_gram_torch(A1, G1, A2=None, G2=None):
    """Reference: (A1 A2ᵀ) ⊙ Σ_k G1_k G2_kᵀ, materializing both n1×n2 factors."""
    A2 = A1 if A2 is None else A2
    G2 = G1 if G2 is None else G2
    acc = torch.promote_types(A1.dtype, torch.float32)
    AA = A1.to(acc) @ A2.to(acc).T
    GG = torch.einsum("ikd,jkd->ij", G1.to(acc), G2.to(acc))
    return AA * GG


@jit
def _factored_dense_kernel(a1_ptr, g1_ptr, a2_ptr, g2_ptr, out_ptr, pairs_ptr, n1, n2, d_in, c, d_out,
                           stride_a1n, stride_a1d, stride_g1n, stride_g1k, stride_g1d,
                           stride_a2n, stride_a2d, stride_g2n, stride_g2k, stride_g2d, stride_om, stride_on,
                           SYMMETRIC: tl.constexpr, ACCUMULATE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr,
                           BLOCK_DG: tl.constexpr, PRECISION_A: tl.constexpr, PRECISION_G: tl.constexpr,
                           UPCAST: tl.constexpr):
    """out[I, J] (+)= (A1[I] A2[J]ᵀ) ⊙ (Σ_k G1[I, k] G2[J, k]ᵀ) for this program's tile (I, J)."""
    tile_m, tile_n = tile_of_program(pairs_ptr, n2, BLOCK_N, SYMMETRIC)
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_in = rows[:, None] < n1
    col_in = cols[:, None] < n2

    activations = block_product(a1_ptr, a2_ptr, rows, cols, row_in, col_in, stride_a1n, stride_a1d, stride_a2n,
                                stride_a2d, d_in, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), BLOCK_DA,
                                PRECISION_A, UPCAST)

    cotangents = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, c):
        cotangents = block_product(g1_ptr + k * stride_g1k, g2_ptr + k * stride_g2k, rows, cols, row_in, col_in,
                                   stride_g1n, stride_g1d, stride_g2n, stride_g2d, d_out, cotangents, BLOCK_DG,
                                   PRECISION_G, UPCAST)

    store_tile(out_ptr, stride_om, stride_on, rows, cols, activations * cotangents, n1, n2, SYMMETRIC,
               ACCUMULATE, False)


def _same_dtype(X1, X2):
    """Both operands of a ``tl.dot`` must share a dtype: widen to float32 when they differ."""
    return (X1, X2) if X1.dtype == X2.dtype else (X1.float(), X2.float())


def factored_dense_gram_triton(A1, G1, A2=None, G2=None, *, out=None, allow_tf32=False):
    """Host wrapper of the fused Triton kernel: returns the (n1, n2) float32 Gram, or adds it into ``out``."""
    symmetric = A2 is None
    A2_, G2_ = (A1, G1) if symmetric else (A2, G2)
    if A1.dim() != 2 or A2_.dim() != 2 or G1.dim() != 3 or G2_.dim() != 3:
        raise ValueError("factored_dense_gram expects A (n, d_in) and G (n, c, d_out), got "
                         f"{tuple(A1.shape)}, {tuple(G1.shape)}, {tuple(A2_.shape)}, {tuple(G2_.shape)}")
    if A1.shape[1] != A2_.shape[1] or G1.shape[1:] != G2_.shape[1:] or A1.shape[0] != G1.shape[0] \
            or A2_.shape[0] != G2_.shape[0]:
        raise ValueError(f"inconsistent shapes A1 {tuple(A1.shape)}, G1 {tuple(G1.shape)}, A2 {tuple(A2_.shape)}, "
                         f"G2 {tuple(G2_.shape)}: A is (n, d_in), G is (n, c, d_out) with matching n, c, d")
    A1, A2_ = _same_dtype(A1, A2_)
    G1, G2_ = _same_dtype(G1, G2_)
    n1, d_in = A1.shape
    n2 = A2_.shape[0]
    c, d_out = G1.shape[1:]
    buffer, accumulate = output_buffer(out, (n1, n2), A1.device)
    if n1 == 0 or n2 == 0:
        return finish(out, buffer if accumulate else buffer.zero_())
    check_launchable(_factored_dense_kernel, "factored_dense_gram")
    block_m = dot_block(n1, largest=64)
    block_n = block_m if symmetric else dot_block(n2, largest=64)
    pairs, programs = tile_grid(n1, n2, block_m, block_n, symmetric, A1.device, buffer)
    _factored_dense_kernel[(programs,)](
        A1, G1, A2_, G2_, buffer, pairs, n1, n2, d_in, c, d_out,
        A1.stride(0), A1.stride(1), G1.stride(0), G1.stride(1), G1.stride(2),
        A2_.stride(0), A2_.stride(1), G2_.stride(0), G2_.stride(1), G2_.stride(2), buffer.stride(0), buffer.stride(1),
        SYMMETRIC=symmetric, ACCUMULATE=accumulate, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_DA=dot_block(d_in, largest=32), BLOCK_DG=dot_block(d_out, largest=32),
        PRECISION_A=dot_precision(A1.dtype, allow_tf32), PRECISION_G=dot_precision(G1.dtype, allow_tf32),
        UPCAST=upcast_for_dot(A1.dtype) or upcast_for_dot(G1.dtype), num_warps=4, num_stages=2)
    return finish(out, buffer)


def factored_dense_gram(A1, G1, A2=None, G2=None, *, out=None, backend="auto", allow_tf32=False):
    """K[i, j] = (A1[i]·A2[j]) Σ_k (G1[i,k]·G2[j,k]), added into ``out`` when given.

    A (n, d_in), G (n, c, d_out); ``A2, G2 = None`` means the symmetric case. Returns (n1, n2).
    ``allow_tf32`` lets the Triton kernel multiply float32 inputs in TF32.
    """
    if (A2 is None) != (G2 is None):
        raise ValueError("pass both A2 and G2 for a cross Gram, or neither for the symmetric one")
    tensors = [t for t in (A1, G1, A2, G2) if t is not None]
    chosen = resolve(backend, *tensors, supports=("torch", "triton"), prefer=("triton", "torch"),
                     op="factored_dense_gram")
    chosen = pick_backend(chosen, backend, tensors, "factored_dense_gram")
    if chosen == "triton":
        return factored_dense_gram_triton(A1, G1, A2, G2, out=out, allow_tf32=allow_tf32)
    return finish(out, factored_dense_gram_torch(A1, G1, A2, G2))
