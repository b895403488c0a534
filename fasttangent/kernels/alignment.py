"""Alignment reductions: ⟨K1, K2⟩_F, ‖K1‖²_F, ‖K2‖²_F (optionally centered), and the
representation route ⟨R1R1ᵀ, R2R2ᵀ⟩_F = ‖R1ᵀR2‖²_F.

The Triton path reads K1 and K2 once: each program reduces one tile into three float64
partial sums, and a deterministic second stage (a torch sum over programs) adds them.
The centered variant first runs a light pass for the row and column sums of both Grams
(two-stage as well), then the same fused pass centers each tile in registers:
(HKH)[i, j] = K[i, j] − r_i − c_j + μ with r, c the row and column means and μ the mean.
"""
from __future__ import annotations

import torch

from ..backends import resolve
from ._triton import KERNEL_DTYPES, check_launchable, jit, next_power_of_2, pick_backend, tl, triton
from .gram import gram_triton

_GRAM_DTYPES = KERNEL_DTYPES + (torch.float64,)  # the reductions read float64 Grams too


def _center(K: torch.Tensor) -> torch.Tensor:
    """H K H with H = I − 11ᵀ/n, i.e. double centering."""
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def alignment_terms_torch(K1, K2, centered=False):
    acc = torch.promote_types(K1.dtype, torch.float64)
    K1, K2 = K1.to(acc), K2.to(acc)
    if centered:
        K1, K2 = _center(K1), _center(K2)
    return (K1 * K2).sum(), (K1 * K1).sum(), (K2 * K2).sum()


@jit
def _tile(k_ptr, rows, cols, inside, stride_r, stride_c):
    """A tile of K widened to float64 (through float32, which every input dtype converts to exactly)."""
    tile = tl.load(k_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=inside, other=0.0)
    return tile.to(tl.float32).to(tl.float64) if tile.dtype != tl.float64 else tile


@jit
def _margins_kernel(k1_ptr, k2_ptr, rows_ptr, cols_ptr, m_rows, m_cols,
                    stride_1r, stride_1c, stride_2r, stride_2c,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-tile row and column sums of K1 and K2 (float64).

    rows[s, tile_c, i] holds Σ_{j in tile_c} K_s[i, j]; cols[s, tile_r, j] holds Σ_{i in tile_r} K_s[i, j].
    """
    tile_r = tl.program_id(0)
    tile_c = tl.program_id(1)
    rows = (tile_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (tile_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    inside = (rows[:, None] < m_rows) & (cols[None, :] < m_cols)
    k1 = _tile(k1_ptr, rows, cols, inside, stride_1r, stride_1c)
    k2 = _tile(k2_ptr, rows, cols, inside, stride_2r, stride_2c)
    tiles_r = tl.num_programs(0)
    tiles_c = tl.num_programs(1)
    row_out = rows_ptr + tile_c * m_rows + rows
    col_out = cols_ptr + tile_r * m_cols + cols
    tl.store(row_out, tl.sum(k1, axis=1), mask=rows < m_rows)
    tl.store(row_out + tiles_c * m_rows, tl.sum(k2, axis=1), mask=rows < m_rows)
    tl.store(col_out, tl.sum(k1, axis=0), mask=cols < m_cols)
    tl.store(col_out + tiles_r * m_cols, tl.sum(k2, axis=0), mask=cols < m_cols)


@jit
def _alignment_kernel(k1_ptr, k2_ptr, means_ptr, partial_ptr, m_rows, m_cols,
                      stride_1r, stride_1c, stride_2r, stride_2c,
                      CENTERED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """partial[pid] = (Σ K1 K2, Σ K1², Σ K2²) over this program's tile, centered first if asked.

    means (CENTERED only): [r1 (m_rows), c1 (m_cols), r2 (m_rows), c2 (m_cols), μ1, μ2], float64.
    """
    tile_r = tl.program_id(0)
    tile_c = tl.program_id(1)
    rows = (tile_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (tile_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    row_in = rows < m_rows
    col_in = cols < m_cols
    inside = row_in[:, None] & col_in[None, :]
    k1 = _tile(k1_ptr, rows, cols, inside, stride_1r, stride_1c)
    k2 = _tile(k2_ptr, rows, cols, inside, stride_2r, stride_2c)
    if CENTERED:
        size = m_rows + m_cols
        r1 = tl.load(means_ptr + rows, mask=row_in, other=0.0)
        c1 = tl.load(means_ptr + m_rows + cols, mask=col_in, other=0.0)
        r2 = tl.load(means_ptr + size + rows, mask=row_in, other=0.0)
        c2 = tl.load(means_ptr + size + m_rows + cols, mask=col_in, other=0.0)
        mu1 = tl.load(means_ptr + 2 * size)
        mu2 = tl.load(means_ptr + 2 * size + 1)
        # padding must stay zero after centering, or it would enter the sums
        k1 = tl.where(inside, k1 - r1[:, None] - c1[None, :] + mu1, 0.0)
        k2 = tl.where(inside, k2 - r2[:, None] - c2[None, :] + mu2, 0.0)
    out = partial_ptr + 3 * (tile_r * tl.num_programs(1) + tile_c)
    tl.store(out, tl.sum(tl.sum(k1 * k2, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(k1 * k1, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(k2 * k2, axis=1), axis=0))


def scratch(shape, device) -> torch.Tensor:
    """Uninitialized float64 buffer for per-tile partial sums (each program writes its own slots)."""
    return torch.empty(shape, dtype=torch.float64, device=device)


def _tile_shape(m_rows: int, m_cols: int) -> tuple[int, int]:
    """64×64 tiles (4096 elements per program: a memory-bound pass), smaller for a tiny Gram."""
    return min(64, next_power_of_2(m_rows)), min(64, next_power_of_2(m_cols))


def _means(K1, K2, block_r, block_c):
    """[r1, c1, r2, c2, μ1, μ2] (float64): row and column means of both Grams, and their means."""
    m_rows, m_cols = K1.shape
    tiles = (triton.cdiv(m_rows, block_r), triton.cdiv(m_cols, block_c))
    row_sums = scratch((2, tiles[1], m_rows), K1.device)
    col_sums = scratch((2, tiles[0], m_cols), K1.device)
    check_launchable(_margins_kernel, "alignment_terms")
    _margins_kernel[tiles](K1, K2, row_sums, col_sums, m_rows, m_cols, *K1.stride(), *K2.stride(),
                           BLOCK_R=block_r, BLOCK_C=block_c)
    rows = row_sums.sum(dim=1)  # (2, m_rows)
    cols = col_sums.sum(dim=1)  # (2, m_cols)
    totals = rows.sum(dim=1) / (m_rows * m_cols)
    rows, cols = rows / m_cols, cols / m_rows
    return torch.cat((rows[0], cols[0], rows[1], cols[1], totals))


def alignment_terms_triton(K1: torch.Tensor, K2: torch.Tensor, centered: bool = False):
    """Host wrapper of the fused reduction: (⟨K1,K2⟩_F, ‖K1‖²_F, ‖K2‖²_F) as float64 0-d tensors."""
    if K1.dim() != 2:
        raise ValueError(f"alignment_terms reads 2-d Grams, got shape {tuple(K1.shape)}; flatten (n, n, c, c) "
                         "Grams to (n·c, n·c) first")
    m_rows, m_cols = K1.shape
    if K1.numel() == 0:
        zero = torch.zeros((), dtype=torch.float64, device=K1.device)
        return zero, zero.clone(), zero.clone()
    block_r, block_c = _tile_shape(m_rows, m_cols)
    tiles = (triton.cdiv(m_rows, block_r), triton.cdiv(m_cols, block_c))
    means = _means(K1, K2, block_r, block_c) if centered else K1  # the uncentered kernel never reads it
    partial = scratch((tiles[0] * tiles[1], 3), K1.device)
    check_launchable(_alignment_kernel, "alignment_terms")
    _alignment_kernel[tiles](K1, K2, means, partial, m_rows, m_cols, *K1.stride(), *K2.stride(),
                             CENTERED=centered, BLOCK_R=block_r, BLOCK_C=block_c)
    cross, norm1, norm2 = partial.sum(dim=0)
    return cross, norm1, norm2


def alignment_terms(K1: torch.Tensor, K2: torch.Tensor, *, centered: bool = False, backend: str = "auto"):
    """Return (⟨K1,K2⟩_F, ‖K1‖²_F, ‖K2‖²_F) as 0-d tensors; K1, K2 (m, m). ``centered``
    applies H·H to both first (CKA)."""
    if K1.shape != K2.shape:
        raise ValueError(f"Grams have different shapes {tuple(K1.shape)} and {tuple(K2.shape)}")
    chosen = resolve(backend, K1, K2, supports=("torch", "triton"), prefer=("triton", "torch"), op="alignment_terms")
    chosen = pick_backend(chosen, backend, (K1, K2), "alignment_terms", dtypes=_GRAM_DTYPES)
    if chosen == "triton":
        return alignment_terms_triton(K1, K2, centered)
    return alignment_terms_torch(K1, K2, centered)


def _squared_norm(M: torch.Tensor) -> torch.Tensor:
    return M.to(torch.float64).square().sum()


def representation_alignment_terms_triton(R1: torch.Tensor, R2: torch.Tensor):
    """Triton route: the Grams (d×d when d < n, else n×n) come from the ``gram`` kernel (float32
    accumulation), the reductions from the alignment kernel or a float64 sum."""
    if max(R1.shape[1], R2.shape[1]) < R1.shape[0]:
        return (_squared_norm(gram_triton(R1.T, R2.T)), _squared_norm(gram_triton(R1.T)),
                _squared_norm(gram_triton(R2.T)))
    return alignment_terms_triton(gram_triton(R1), gram_triton(R2))


def representation_alignment_terms(R1: torch.Tensor, R2: torch.Tensor, *, backend: str = "auto"):
    """(⟨R1R1ᵀ, R2R2ᵀ⟩_F, ‖R1R1ᵀ‖²_F, ‖R2R2ᵀ‖²_F) for R (n, d), without forming n×n
    matrices when d < n: ⟨R1R1ᵀ, R2R2ᵀ⟩_F = ‖R1ᵀR2‖²_F (O(n d²) instead of O(n² d))."""
    if R1.shape[0] != R2.shape[0]:
        raise ValueError(f"representations cover {R1.shape[0]} and {R2.shape[0]} examples; use the same inputs")
    chosen = resolve(backend, R1, R2, supports=("torch", "triton"), prefer=("triton", "torch"),
                     op="representation_alignment_terms")
    chosen = pick_backend(chosen, backend, (R1, R2), "representation_alignment_terms")
    if chosen == "triton":
        return representation_alignment_terms_triton(R1, R2)
    acc = torch.promote_types(R1.dtype, torch.float64)
    R1, R2 = R1.to(acc), R2.to(acc)
    if max(R1.shape[1], R2.shape[1]) < R1.shape[0]:
        cross = (R1.T @ R2).square().sum()
        n1 = (R1.T @ R1).square().sum()
        n2 = (R2.T @ R2).square().sum()
        return cross, n1, n2
    return alignment_terms_torch(R1 @ R1.T, R2 @ R2.T)
