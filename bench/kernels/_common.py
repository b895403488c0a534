"""Shared plumbing of the per-op kernel benchmarks (bench/kernels/bench_<op>.py).

Each benchmark times the Triton kernel, the torch composition it replaces (and the CUDA
extension where one exists) with ``triton.testing.do_bench`` (median), and compares them
with a floor: FLOPs / the measured ``torch.mm`` rate, or bytes moved / the measured copy
bandwidth of this GPU. ``--smoke`` runs tiny shapes on the CPU through the Triton
interpreter, only to prove the script works; its times mean nothing.
"""
from __future__ import annotations

import argparse
import os
import time


def parse(description: str) -> argparse.Namespace:
    """Parse ``--smoke``; under it, turn the Triton interpreter on *before* the kernels are imported."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the script, not speed)")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        import torch
        if not torch.cuda.is_available():
            parser.error("the benchmarks time GPU kernels; run with --smoke on a machine without CUDA")
    return args


def device(args) -> "torch.device":
    import torch
    return torch.device("cpu" if args.smoke else "cuda")


def median_ms(fn, args) -> float:
    """Median milliseconds per call: ``do_bench`` on a GPU, a few wall-clock runs under --smoke."""
    if not args.smoke:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # the interpreter is slow enough: one warm-up and one timed call
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def matmul_flops_per_ms(dtype, args) -> float:
    """Measured FLOP/ms of a square ``torch.mm`` (TF32 off, so float32 runs exact FMA math)."""
    import torch
    n = 64 if args.smoke else 8192
    a = torch.randn(n, n, device=device(args)).to(dtype)
    b = torch.randn(n, n, device=device(args)).to(dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ms = median_ms(lambda: torch.mm(a, b), args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n ** 3 / ms


def copy_bytes_per_ms(args) -> float:
    """Measured bytes/ms of a device-to-device copy (read + write counted)."""
    import torch
    numel = 2 ** 12 if args.smoke else 2 ** 28
    src = torch.empty(numel, dtype=torch.float32, device=device(args))
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), args)
    return 2 * 4 * numel / ms


def header(columns) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")


def row(cells) -> None:
    print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells) + " |", flush=True)


COLUMNS = ["op", "shape", "dtype", "triton ms", "torch ms", "cuda ms", "floor ms", "floor / triton",
           "torch / triton"]


def report(op, shape, dtype, triton_ms, torch_ms, cuda_ms, floor_ms) -> None:
    """One markdown row: times, the floor, the kernel's share of the floor and its speedup over torch."""
    dtype_name = str(dtype).replace("torch.", "")
    cuda_cell = "-" if cuda_ms is None else cuda_ms
    row([op, shape, dtype_name, triton_ms, torch_ms, cuda_cell, floor_ms, floor_ms / triton_ms, torch_ms / triton_ms])


def cuda_op(name: str, args):
    """``fasttangent.cuda_ops.<name>`` when the extension is built and a GPU is used, else None."""
    if args.smoke:
        return None
    from fasttangent.backends import cuda_extension
    if cuda_extension() is None:
        return None
    from fasttangent import cuda_ops
    return getattr(cuda_ops, name)
