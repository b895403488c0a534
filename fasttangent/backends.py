"""Backend selection: *what* is computed lives in the public API, *how* is picked here.

Every op takes ``backend="auto" | "torch" | "triton" | "cuda"``:

- ``"torch"`` composes torch ops; it works on every device.
- ``"triton"`` runs a Triton kernel. On CPU tensors this is only possible under the
  Triton interpreter (``TRITON_INTERPRET=1``), which is how CI tests the kernels.
- ``"cuda"`` runs a kernel of the compiled extension ``fasttangent._C``.
- ``"auto"`` picks, for CUDA tensors, the fastest implementation the op has and the
  machine supports (the op passes its preference order); CPU tensors take ``"torch"``.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it may still lack a GPU: see ``triton_interpreting``)."""
    try:
        importlib.import_module("triton")
        return True
    except Exception:  # triton raises assorted errors on machines without a driver
        return False


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled module ``fasttangent._C``, or ``None`` when it was not built."""
    try:
        return importlib.import_module("fasttangent._C")
    except ImportError:
        return None


def _device_of(tensors) -> torch.device:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"tensors are on different devices {sorted(map(str, devices))}; move them to one device")
    return devices.pop() if devices else torch.device("cpu")


def resolve(backend: str, *tensors: torch.Tensor, supports=("torch", "triton", "cuda"), prefer=("cuda", "triton", "torch"), op: str = "op") -> str:
    """Return the concrete backend ("torch", "triton" or "cuda") an op should run with.

    ``supports`` lists the implementations the op has; ``prefer`` is its speed order on
    a GPU. An explicit request that cannot run raises ``ValueError`` saying why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    device = _device_of(tensors)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for name in prefer:
            if name in supports and _usable(name, device):
                return name
        return "torch"
    if backend not in supports:
        raise ValueError(f"{op} has no {backend!r} implementation; use one of {tuple(supports)} or 'auto'")
    if not _usable(backend, device):
        raise ValueError(_why_unusable(backend, device, op))
    return backend


def _usable(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        return triton_available() and (device.type == "cuda" or triton_interpreting())
    if name == "cuda":
        return device.type == "cuda" and cuda_extension() is not None
    return False


def _why_unusable(name: str, device: torch.device, op: str) -> str:
    if name == "triton" and not triton_available():
        return f"{op}: backend='triton' but triton is not installed (pip install triton)"
    if name == "triton":
        return (f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernel "
                f"in the interpreter on {device.type} tensors")
    if device.type != "cuda":
        return f"{op}: backend='cuda' needs CUDA tensors, got {device.type} tensors"
    return (f"{op}: backend='cuda' but the extension fasttangent._C was not built; reinstall with "
            "FASTTANGENT_BUILD_CUDA=1 on a machine with nvcc and a CUDA build of torch")
