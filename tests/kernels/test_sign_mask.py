"""Sign-mask kernels: bit packing (same layout as the torch reference) and XOR + popcount
match counting, against element-wise comparisons and hand-computed cases."""
import pytest
import torch

from fasttangent.kernels.sign_mask import (count_sign_matches, count_sign_matches_torch, pack_signs, pack_signs_torch,
                                           pack_signs_triton, count_sign_matches_triton)

SENTINEL = 0x5A5A5A5A  # a word no test input packs to (checked), to spot unwritten words


def _activations(shape, dtype, rng):
    """Normal values with exact zeros mixed in (zero is "off", like a dead ReLU)."""
    x = torch.randn(shape, generator=rng)
    x[torch.rand(shape, generator=rng) < 0.2] = 0.0
    return x.to(dtype)


def _hand_packed(x):
    """Bit b of word w = (x.flat[32w + b] > 0), built with Python integers."""
    on = (x.reshape(-1) > 0).tolist()
    words = []
    for start in range(0, len(on), 32):
        word = sum(1 << b for b, bit in enumerate(on[start:start + 32]) if bit)
        words.append(word - 2**32 if word >= 2**31 else word)
    return torch.tensor(words, dtype=torch.int32)


# sizes around the 32-bit words and the 4096-element program blocks (5000: two programs)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (31,), (32,), (3, 11), (2, 5, 7, 9), (5000,)])
def test_packing_matches_hand_layout(shape, dtype, rng):
    x = _activations(shape, dtype, rng)
    expected = _hand_packed(x)
    assert torch.equal(pack_signs_torch(x), expected)  # the reference has the same layout
    assert SENTINEL not in expected.tolist()
    out = torch.full_like(expected, SENTINEL)
    assert pack_signs_triton(x, out=out) is out
    assert torch.equal(out, expected)


def test_packing_bit_31_and_strided_input(rng):
    """Bit 31 wraps to a negative int32; a non-contiguous view packs in logical (row-major) order."""
    x = torch.full((32,), -1.0)
    x[31] = 1.0
    assert pack_signs_triton(x).item() == -2**31
    base = _activations((9, 40), torch.float32, rng)
    assert torch.equal(pack_signs_triton(base.T), _hand_packed(base.T.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (33,), (4, 25), (5000,)])
def test_counts_match_elementwise_comparison(shape, dtype, rng):
    reference = _activations(shape, dtype, rng)
    live = (reference.float() + 0.7 * torch.randn(shape, generator=rng)).to(dtype)
    expected = ((live > 0) == (reference > 0)).sum().item()
    count = count_sign_matches_triton(live, pack_signs_torch(reference))
    assert count.dtype == torch.int64 and count.dim() == 0
    assert count.item() == expected


def test_hand_computed_counts(rng):
    """All statuses equal -> numel; every status flipped -> 0 (no zeros in x)."""
    x = torch.randn(1001, generator=rng)
    x[x == 0] = 1.0
    packed = pack_signs_torch(x)
    assert count_sign_matches_triton(x, packed).item() == 1001
    assert count_sign_matches_triton(-x, packed).item() == 0


def test_padding_bits_of_the_reference_are_ignored(rng):
    """Bits past the last element are not units, whatever the reference stores there."""
    x = _activations((45,), torch.float32, rng)
    packed = pack_signs_torch(x)
    packed[-1] |= torch.tensor(-2**31, dtype=torch.int32)  # set bit 31 of the last word (element 63)
    assert count_sign_matches_triton(x, packed).item() == 45


def test_public_dispatch_and_errors(rng):
    x = _activations((7, 13), torch.float32, rng)
    packed = pack_signs(x, backend="triton")
    assert torch.equal(packed, pack_signs(x, backend="torch"))
    y = _activations((7, 13), torch.float32, rng)
    assert count_sign_matches(y, packed, backend="triton").item() == count_sign_matches_torch(y, packed).item()
    with pytest.raises(ValueError, match="words"):
        count_sign_matches(y[:, :5], packed, backend="triton")
    with pytest.raises(ValueError, match="int32"):
        count_sign_matches(y, packed.to(torch.int64), backend="triton")
    with pytest.raises(ValueError, match="float64"):
        pack_signs(x.double(), backend="triton")
