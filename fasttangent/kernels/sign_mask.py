"""ReLU sign masks: pack on/off states into bits, count agreements with a packed reference.

A unit is "on" when its value is > 0. ``pack_signs`` stores bit b of word w as the
status of element 32·w + b of the flattened tensor (int32 words, zero padded).

The Triton kernels read each activation exactly once: a program loads a (words × 32)
block, sums (= ORs) the shifted status bits into one uint32 word per row, and either stores the
words (packing) or XORs them with the reference words and counts the set bits of the
difference (mismatches), adding its partial count atomically into one int64 counter.
"""
from __future__ import annotations

import torch

from ..backends import resolve
from ._triton import check_launchable, jit, next_power_of_2, pick_backend, tl, triton

BITS = 32
# Both kernels read the activations once and are bound by memory; the compiled CUDA one
# skips Triton's JIT warm-up, so it goes first.
_SUPPORTS = ("torch", "triton", "cuda")
_PREFER = ("cuda", "triton", "torch")
_SHIFTS = torch.arange(BITS, dtype=torch.int64)


def pack_signs_torch(x: torch.Tensor) -> torch.Tensor:
    """Reference packing: (numel,) booleans -> (ceil(numel/32),) int32 words."""
    on = (x.reshape(-1) > 0).to(torch.int64)
    pad = (-on.numel()) % BITS
    on = torch.nn.functional.pad(on, (0, pad)).view(-1, BITS)
    words = (on << _SHIFTS.to(on.device)).sum(dim=1)
    # two's-complement wrap of bit 31 so the word fits int32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def count_sign_matches_torch(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Reference: number of elements of ``x`` whose status equals the packed reference."""
    n = x.numel()
    bits = (packed.to(torch.int64).unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    ref_on = bits.reshape(-1)[:n].bool()
    return ((x.reshape(-1) > 0) == ref_on).sum()


@jit
def _popcount(v):
    """Set bits of each uint32 (SWAR: pairs, nibbles, bytes; Triton has no popcount builtin)."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = v + (v >> 8)
    v = v + (v >> 16)
    return v & 0x3F


@jit
def _status_words(x_ptr, words, numel, BLOCK_WORDS: tl.constexpr):
    """(live, valid): uint32 words of the statuses x > 0 of elements 32·w + b, and of which bits exist."""
    bits = tl.arange(0, 32)
    index = words[:, None] * 32 + bits[None, :]
    exists = index < numel
    x = tl.load(x_ptr + index, mask=exists, other=0)
    shifts = bits[None, :].to(tl.uint32)
    # the 32 shifted bits of a row are distinct, so their sum is their bitwise OR
    live = tl.sum((x > 0).to(tl.uint32) << shifts, axis=1)
    valid = tl.sum(exists.to(tl.uint32) << shifts, axis=1)
    return live, valid


@jit
def _pack_signs_kernel(x_ptr, packed_ptr, numel, n_words, BLOCK_WORDS: tl.constexpr):
    """packed[w] = Σ_b [x[32w + b] > 0] 2^b for this program's BLOCK_WORDS words."""
    words = (tl.program_id(0) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)).to(tl.int64)
    live, _ = _status_words(x_ptr, words, numel, BLOCK_WORDS)
    tl.store(packed_ptr + words, live.to(tl.int32, bitcast=True), mask=words < n_words)


@jit
def _count_mismatches_kernel(x_ptr, packed_ptr, count_ptr, numel, n_words, BLOCK_WORDS: tl.constexpr):
    """count += popcount((live words) XOR (reference words)) over this program's words."""
    words = (tl.program_id(0) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)).to(tl.int64)
    live, valid = _status_words(x_ptr, words, numel, BLOCK_WORDS)
    reference = tl.load(packed_ptr + words, mask=words < n_words, other=0).to(tl.uint32, bitcast=True)
    # padding bits of the last word are not elements: drop them whatever the reference holds there
    differ = (live ^ reference) & valid
    tl.atomic_add(count_ptr, tl.sum(_popcount(differ).to(tl.int64), axis=0))


def _block_words(n_words: int) -> int:
    """128 words (4096 elements) per program, fewer for a tiny tensor."""
    return max(1, min(128, next_power_of_2(n_words)))


def pack_signs_triton(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Host wrapper of the packing kernel. ``out`` (int32, ceil(numel/32) words) is overwritten when given."""
    n_words = -(-x.numel() // BITS)
    if out is None:
        out = torch.empty(n_words, dtype=torch.int32, device=x.device)
    elif out.dtype != torch.int32 or out.numel() != n_words:
        raise ValueError(f"out must be int32 with {n_words} words, got {out.dtype} with {out.numel()}")
    if n_words == 0:
        return out
    check_launchable(_pack_signs_kernel, "pack_signs")
    block = _block_words(n_words)
    _pack_signs_kernel[(triton.cdiv(n_words, block),)](x.reshape(-1), out, x.numel(), n_words, BLOCK_WORDS=block)
    return out


def count_sign_matches_triton(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Host wrapper of the XOR + popcount kernel. Returns a 0-d int64 count of matching statuses."""
    n_words = packed.numel()
    mismatches = torch.zeros(1, dtype=torch.int64, device=x.device)
    if n_words:
        check_launchable(_count_mismatches_kernel, "count_sign_matches")
        block = _block_words(n_words)
        _count_mismatches_kernel[(triton.cdiv(n_words, block),)](
            x.reshape(-1), packed.reshape(-1), mismatches, x.numel(), n_words, BLOCK_WORDS=block)
    return x.numel() - mismatches[0]


def pack_signs(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Bit-pack the on/off status (x > 0) of every element of ``x``. Returns int32 (ceil(numel/32),)."""
    chosen = resolve(backend, x, supports=_SUPPORTS, prefer=_PREFER, op="pack_signs")
    chosen = pick_backend(chosen, backend, (x,), "pack_signs")
    if chosen == "cuda":
        from ..cuda_ops import pack_signs_cuda
        return pack_signs_cuda(x)
    if chosen == "triton":
        return pack_signs_triton(x)
    return pack_signs_torch(x)


def count_sign_matches(x: torch.Tensor, packed: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Count elements of ``x`` whose status (x > 0) equals the packed reference. Returns a 0-d int64."""
    expected = -(-x.numel() // BITS)
    if packed.numel() != expected:
        raise ValueError(f"packed reference has {packed.numel()} words but x has {x.numel()} elements "
                         f"({expected} words); was it recorded on the same inputs and model?")
    chosen = resolve(backend, x, packed, supports=_SUPPORTS, prefer=_PREFER, op="count_sign_matches")
    chosen = pick_backend(chosen, backend, (x,), "count_sign_matches")
    if chosen != "torch" and packed.dtype != torch.int32:
        raise ValueError(f"packed reference must be int32 words from pack_signs, got {packed.dtype}")
    if chosen == "cuda":
        from ..cuda_ops import count_sign_matches_cuda
        return count_sign_matches_cuda(x, packed.reshape(-1))
    if chosen == "triton":
        return count_sign_matches_triton(x, packed)
    return count_sign_matches_torch(x, packed)
