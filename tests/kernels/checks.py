"""Shared checks of the kernel tests: error bounds per dtype and poisoned output buffers."""
import torch

# Error bounds, relative to Σ|x||y| (the size of the summands, not of their possibly
# cancelling sum). bfloat16 inputs are compared with the float64 products of the *same*
# bfloat16 values, so both dtypes only see float32 accumulation error; float32 inputs
# also see the float32 rounding of the result.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}


def assert_within(actual, expected, scale, dtype):
    """|actual − expected| <= TOLERANCE[dtype] · scale elementwise (all float64 here)."""
    actual, expected, scale = actual.double(), expected.double(), scale.double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "the kernel left non-finite entries (an unwritten poisoned element?)"
    error = (actual - expected).abs()
    bound = TOLERANCE[dtype] * scale + 1e-30
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"error {error.max().item():.3g} exceeds the {dtype} bound by {worst:.3g}x"


def poisoned_buffer(monkeypatch, module):
    """Make ``module.output_buffer`` hand out a NaN-filled buffer to overwrite; returns the
    list the buffers are appended to, so a test can check the kernel wrote every element."""
    handed_out = []

    def nan_buffer(out, shape, device):
        buffer = torch.full(shape, float("nan"), dtype=torch.float32, device=device)
        handed_out.append(buffer)
        return buffer, False

    monkeypatch.setattr(module, "output_buffer", nan_buffer)
    return handed_out
