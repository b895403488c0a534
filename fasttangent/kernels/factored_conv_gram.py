"""Fused factored Gram of an unfolded convolution or sequence layer.

With A_i (T, d_in) the unfolded input patches of example i and G_ik (T, d_out) the
cotangent of output k at each position, the weight-gradient Gram term is
K[i, j] += Σ_k ⟨A_i A_jᵀ, G_ik G_jkᵀ⟩_F = Σ_k Σ_{t,s} (a_it·a'_js)(g_ikt·g'_jks).

A1: (n1, T1, d_in), G1: (n1, c, T1, d_out), A2: (n2, T2, d_in), G2: (n2, c, T2, d_out).

The Triton kernel is tiled like flash attention: one program per example pair (i, j)
(only i <= j for the symmetric Gram, mirrored), looping over blocks of positions t and s;
each block of A_i A_jᵀ and of Σ_k G_ik G_jkᵀ lives only in registers, so no T1×T2 matrix is
ever stored.
"""
from __future__ import annotations

import torch

from ..backends import resolve
from ._triton import (block_product, check_launchable, dot_block, dot_precision, finish, jit, output_buffer, pick_backend, tl,
                      upcast_for_dot, upper_tile_pairs)


def factored_conv_gram_torch(A1, G1, A2=None, G2=None):
    """Reference: the unfused composition, materializing every T1×T2 product."""
    A2 = A1 if A2 is None else A2
    G2 = G1 if G2 is None else G2
    acc = torch.promote_types(A1.dtype, torch.float32)
    AA = torch.einsum("itd,jsd->ijts", A1.to(acc), A2.to(acc))
    GG = torch.einsum("iktd,jksd->ijts", G1.to(acc), G2.to(acc))
    return (AA * GG).sum(dim=(2, 3))


@jit
def _factored_conv_kernel(a1_ptr, g1_ptr, a2_ptr, g2_ptr, out_ptr, pairs_ptr, n2, T1, T2, d_in, c, d_out,
                          stride_a1n, stride_a1t, stride_a1d, stride_g1n, stride_g1k, stride_g1t, stride_g1d,
                          stride_a2n, stride_a2t, stride_a2d, stride_g2n, stride_g2k, stride_g2t, stride_g2d,
                          stride_om, stride_on,
                          SYMMETRIC: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DG: tl.constexpr,
                          PRECISION_A: tl.constexpr, PRECISION_G: tl.constexpr, UPCAST: tl.constexpr):
    """out[i, j] (+)= Σ_{t,s} (A1_i A2_jᵀ)[t, s] (Σ_k G1_ik G2_jkᵀ)[t, s] for this program's pair (i, j)."""
    pid = tl.program_id(0)
    if SYMMETRIC:
        i = tl.load(pairs_ptr + 2 * pid).to(tl.int64)
        j = tl.load(pairs_ptr + 2 * pid + 1).to(tl.int64)
    else:
        i = (pid // n2).to(tl.int64)
        j = (pid % n2).to(tl.int64)
    a1_i = a1_ptr + i * stride_a1n
    a2_j = a2_ptr + j * stride_a2n
    g1_i = g1_ptr + i * stride_g1n
    g2_j = g2_ptr + j * stride_g2n

    total = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    for t0 in range(0, T1, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_in = ts[:, None] < T1
        for s0 in range(0, T2, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            s_in = ss[:, None] < T2
            activations = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
            activations = block_product(a1_i, a2_j, ts, ss, t_in, s_in, stride_a1t, stride_a1d, stride_a2t,
                                         stride_a2d, d_in, activations, BLOCK_DA, PRECISION_A, UPCAST)
            cotangents = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
            for k in range(0, c):
                cotangents = block_product(g1_i + k * stride_g1k, g2_j + k * stride_g2k, ts, ss, t_in, s_in,
                                            stride_g1t, stride_g1d, stride_g2t, stride_g2d, d_out, cotangents,
                                            BLOCK_DG, PRECISION_G, UPCAST)
            total += activations * cotangents
    value = tl.sum(tl.sum(total, axis=1), axis=0).to(out_ptr.dtype.element_ty)

    target = out_ptr + i * stride_om + j * stride_on
    if ACCUMULATE:
        tl.store(target, tl.load(target) + value)
    else:
        tl.store(target, value)
    if SYMMETRIC:
        if i != j:  # the mirrored entry of an off-diagonal pair
            mirrored = out_ptr + j * stride_om + i * stride_on
            if ACCUMULATE:
                tl.store(mirrored, tl.load(mirrored) + value)
            else:
                tl.store(mirrored, value)


def factored_conv_gram_triton(A1, G1, A2=None, G2=None, *, out=None, allow_tf32=False):
    """Host wrapper of the fused Triton kernel: returns the (n1, n2) float32 Gram, or adds it into ``out``."""
    symmetric = A2 is None
    A2_, G2_ = (A1, G1) if symmetric else (A2, G2)
    if A1.dim() != 3 or A2_.dim() != 3 or G1.dim() != 4 or G2_.dim() != 4:
        raise ValueError("factored_conv_gram expects A (n, T, d_in) and G (n, c, T, d_out), got "
                         f"{tuple(A1.shape)}, {tuple(G1.shape)}, {tuple(A2_.shape)}, {tuple(G2_.shape)}")
    n1, T1, d_in = A1.shape
    n2, T2, _ = A2_.shape
    c, _, d_out = G1.shape[1:]
    if (A2_.shape[2] != d_in or G1.shape[0] != n1 or G1.shape[2] != T1 or G2_.shape[0] != n2
            or G2_.shape[1] != c or G2_.shape[2] != T2 or G2_.shape[3] != d_out):
        raise ValueError(f"inconsistent shapes A1 {tuple(A1.shape)}, G1 {tuple(G1.shape)}, A2 {tuple(A2_.shape)}, "
                         f"G2 {tuple(G2_.shape)}: A is (n, T, d_in), G is (n, c, T, d_out) with matching n, T, c, d")
    if A1.dtype != A2_.dtype:  # tl.dot needs one operand dtype
        A1, A2_ = A1.float(), A2_.float()
    if G1.dtype != G2_.dtype:
        G1, G2_ = G1.float(), G2_.float()
    buffer, accumulate = output_buffer(out, (n1, n2), A1.device)
    if n1 == 0 or n2 == 0:
        return finish(out, buffer if accumulate else buffer.zero_())
    check_launchable(_factored_conv_kernel, "factored_conv_gram")
    if symmetric:
        pairs = upper_tile_pairs(n1, A1.device)  # example pairs i <= j: "tiles" of one example
        programs = pairs.shape[0]
    else:
        pairs = buffer  # unused by the cross kernel; any pointer will do
        programs = n1 * n2
    _factored_conv_kernel[(programs,)](
        A1, G1, A2_, G2_, buffer, pairs, n2, T1, T2, d_in, c, d_out,
        *A1.stride(), *G1.stride(), *A2_.stride(), *G2_.stride(), *buffer.stride(),
        SYMMETRIC=symmetric, ACCUMULATE=accumulate, BLOCK_T=dot_block(T1, largest=64),
        BLOCK_S=dot_block(T2, largest=64), BLOCK_DA=dot_block(d_in, largest=32), BLOCK_DG=dot_block(d_out, largest=32),
        PRECISION_A=dot_precision(A1.dtype, allow_tf32), PRECISION_G=dot_precision(G1.dtype, allow_tf32),
        UPCAST=upcast_for_dot(A1.dtype) or upcast_for_dot(G1.dtype), num_warps=4, num_stages=2)
    return finish(out, buffer)


def factored_conv_gram(A1, G1, A2=None, G2=None, *, out=None, backend="auto", allow_tf32=False):
    """K[i, j] = Σ_k ⟨A1_i A2_jᵀ, G1_ik G2_jkᵀ⟩_F, added into ``out`` when given. Returns (n1, n2).

    ``allow_tf32`` lets the Triton kernel multiply float32 inputs in TF32.
    """
    if (A2 is None) != (G2 is None):
        raise ValueError("pass both A2 and G2 for a cross Gram, or neither for the symmetric one")
    tensors = [t for t in (A1, G1, A2, G2) if t is not None]
    chosen = resolve(backend, *tensors, supports=("torch", "triton"), prefer=("triton", "torch"),
                     op="factored_conv_gram")
    chosen = pick_backend(chosen, backend, tensors, "factored_conv_gram")
    if chosen == "triton":
        return factored_conv_gram_triton(A1, G1, A2, G2, out=out, allow_tf32=allow_tf32)
    return finish(out, factored_conv_gram_torch(A1, G1, A2, G2))
