"""ReLU sign masks: pack on/off states into bits, count agreements with a packed reference.

A unit is "on" when its value is > 0. ``pack_signs`` stores bit b of word w as the
status of element 32·w + b of the flattened tensor (int32 words, zero padded).
"""
from __future__ import annotations

import torch

from ..backends import resolve

BITS = 32
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


def pack_signs(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Bit-pack the on/off status (x > 0) of every element of ``x``. Returns int32 (ceil(numel/32),)."""
    resolve(backend, x, supports=("torch",), op="pack_signs")
    return pack_signs_torch(x)


def count_sign_matches(x: torch.Tensor, packed: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Count elements of ``x`` whose status (x > 0) equals the packed reference. Returns a 0-d int64."""
    expected = -(-x.numel() // BITS)
    if packed.numel() != expected:
        raise ValueError(f"packed reference has {packed.numel()} words but x has {x.numel()} elements "
                         f"({expected} words); was it recorded on the same inputs and model?")
    resolve(backend, x, packed, supports=("torch",), op="count_sign_matches")
    return count_sign_matches_torch(x, packed)
