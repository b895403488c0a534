"""Python entry points of the compiled CUDA kernels in ``fasttangent._C`` (``csrc/``).

Same semantics and bit layout as the torch references in ``fasttangent.kernels``:

- ``gram_cuda(J1, J2=None, out=None)``: K (+)= J1 J2ᵀ with float32 accumulation;
  the symmetric J1 J1ᵀ computes only upper-triangle tiles and mirrors them (exactly
  symmetric). When the tiles alone would leave the GPU idle (n << p, the usual NTK
  shape), p is split over blocks and the parts are summed in a fixed order, so the
  result stays deterministic.
- ``pack_signs_cuda(x)``: bit b of int32 word w is (x > 0) of flat element 32·w + b,
  zero padded, ceil(numel / 32) words.
- ``count_sign_matches_cuda(x, packed)``: number of elements whose status equals the
  packed reference, as a 0-d int64, reading ``x`` once.

Each raises ``RuntimeError`` naming the fix when the extension was not built, and the
extension's own checks raise ``ValueError``/``TypeError`` for CPU tensors, unsupported
dtypes or mismatched shapes.
"""
from __future__ import annotations

import importlib

import torch

from .backends import cuda_extension

_BUILD_HINT = ("reinstall with `FASTTANGENT_BUILD_CUDA=1 pip install --no-build-isolation -e .` on a machine "
               "with nvcc and a CUDA build of torch, or use backend='torch'")


def extension():
    """The loaded ``fasttangent._C`` module; ``RuntimeError`` with the reason and the fix if absent."""
    module = cuda_extension()
    if module is not None:
        return module
    try:  # import again only to report why it failed
        importlib.import_module("fasttangent._C")
    except ImportError as error:
        reason = f"{type(error).__name__}: {error}"
    else:
        reason = "it failed to import earlier in this process"
    raise RuntimeError(f"the CUDA extension fasttangent._C is not available ({reason}); {_BUILD_HINT}")


def gram_cuda(J1: torch.Tensor, J2: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """K = J1 J2ᵀ (J1 J1ᵀ when J2 is None) in float32, added into ``out`` when given.

    J1 (n1, p), J2 (n2, p): CUDA float32, bfloat16 or float16 with contiguous rows (a
    column slice ``J[:, a:b]`` is fine, which lets parameter chunks stream into ``out``).
    out: (n1, n2) float32 with contiguous rows. Returns ``out`` or a new (n1, n2) tensor.
    """
    return extension().gram(J1, J2, out)


def pack_signs_cuda(x: torch.Tensor) -> torch.Tensor:
    """Bit-pack (x > 0) of every element of a CUDA float32/bfloat16/float16 tensor.

    x: any shape (made contiguous first, which copies only a non-contiguous view).
    Returns int32 (ceil(numel / 32),).
    """
    module = extension()
    return module.pack_signs(x.contiguous())


def count_sign_matches_cuda(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Count elements of ``x`` whose status (x > 0) equals the packed reference.

    x: CUDA float32/bfloat16/float16, any shape; packed: int32 (ceil(numel / 32),) on the
    same device, as ``pack_signs_cuda`` or ``pack_signs_torch`` returns it. Returns a 0-d int64.
    """
    module = extension()
    return module.count_sign_matches(x.contiguous(), packed)
