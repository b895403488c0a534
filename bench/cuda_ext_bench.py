"""Timings of the fasttangent._C kernels against their bandwidth/compute baselines.

- sign compare (count_sign_matches_cuda) and pack: effective read bandwidth against a
  measured device-to-device copy (target: compare >= 70% of copy bandwidth);
- symmetric Gram gram_cuda(J) against torch.mm(J, J.T) in fp32 (target: 1.6x faster
  for n >= 4096), plus the cross kernel gram_cuda(J, J) that computes every tile.

Prints markdown tables; ``--json PATH`` also writes the numbers and the target checks.
Needs a CUDA device and the built extension.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

COPY_FRACTION_TARGET = 0.70
GRAM_SPEEDUP_TARGET = 1.6


def time_ms(fn, warmup=3, repeats=10):
    """Median milliseconds of ``fn()`` over ``repeats`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def sign_rows(numel):
    """Rows (op, dtype, ms, GB/s, fraction of copy bandwidth) for the sign kernels."""
    from fasttangent.cuda_ops import count_sign_matches_cuda, pack_signs_cuda
    from fasttangent.kernels.sign_mask import count_sign_matches_torch

    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * src.nbytes / copy_ms / 1e6  # read + write
    rows = [dict(op="copy (d2d, read+write)", dtype="float32", numel=numel, ms=copy_ms, gbs=copy_gbs, fraction=1.0)]
    del dst
    for dtype in (torch.float32, torch.bfloat16):
        x = src.to(dtype)
        packed = pack_signs_cuda(x)
        x_bytes = x.nbytes + packed.nbytes
        for op, fn in [("count_sign_matches_cuda", lambda: count_sign_matches_cuda(x, packed)),
                       ("pack_signs_cuda", lambda: pack_signs_cuda(x)),
                       ("count_sign_matches_torch", lambda: count_sign_matches_torch(x, packed))]:
            ms = time_ms(fn)
            rows.append(dict(op=op, dtype=str(dtype).removeprefix("torch."), numel=numel, ms=ms,
                             gbs=x_bytes / ms / 1e6, fraction=x_bytes / ms / 1e6 / copy_gbs))
        del x, packed
    return rows


def gram_rows(shapes):
    """Rows (n, p, ms of each way, speedups) for the Gram kernels in fp32 (and bf16 input)."""
    from fasttangent.cuda_ops import gram_cuda

    rows = []
    for n, p in shapes:
        J = torch.randn(n, p, device="cuda")
        mm_ms = time_ms(lambda: torch.mm(J, J.T), repeats=5)
        sym_ms = time_ms(lambda: gram_cuda(J), repeats=5)
        cross_ms = time_ms(lambda: gram_cuda(J, J), repeats=5)
        Jb = J.to(torch.bfloat16)
        sym_bf16_ms = time_ms(lambda: gram_cuda(Jb), repeats=5)
        flops = 2.0 * n * n * p  # of the full product
        rows.append(dict(n=n, p=p, mm_ms=mm_ms, sym_ms=sym_ms, cross_ms=cross_ms, sym_bf16_ms=sym_bf16_ms,
                         mm_tflops=flops / mm_ms / 1e9, sym_equiv_tflops=flops / sym_ms / 1e9,
                         speedup=mm_ms / sym_ms, cross_vs_mm=mm_ms / cross_ms))
        del J, Jb
        torch.cuda.empty_cache()
    return rows


def markdown(sign, grams):
    lines = ["### Sign masks", "", "| op | dtype | numel | ms | GB/s | of copy bandwidth |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['dtype']} | {r['numel']} | {r['ms']:.3f} | {r['gbs']:.0f} | {r['fraction']:.0%} |"
              for r in sign]
    lines += ["", "### Gram (fp32 accumulation; torch.mm in fp32, TF32 off)", "",
              "| n | p | torch.mm(J, J.T) ms | gram_cuda(J) ms | speedup | gram_cuda(J, J) ms | "
              "gram_cuda(J bf16) ms | mm TFLOP/s | symmetric equiv. TFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['p']} | {r['mm_ms']:.2f} | {r['sym_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['cross_ms']:.2f} | {r['sym_bf16_ms']:.2f} | {r['mm_tflops']:.1f} | {r['sym_equiv_tflops']:.1f} |"
              for r in grams]
    return "\n".join(lines)


def target_checks(sign, grams):
    compare = [r for r in sign if r["op"] == "count_sign_matches_cuda" and r["dtype"] == "float32"]
    checks = [dict(name=f"sign compare >= {COPY_FRACTION_TARGET:.0%} of copy bandwidth (fp32)",
                   value=f"{r['fraction']:.0%}", passed=r["fraction"] >= COPY_FRACTION_TARGET) for r in compare]
    checks += [dict(name=f"symmetric Gram >= {GRAM_SPEEDUP_TARGET}x torch.mm(J, J.T), n={r['n']}, p={r['p']}",
                    value=f"{r['speedup']:.2f}x", passed=r["speedup"] >= GRAM_SPEEDUP_TARGET)
               for r in grams if r["n"] >= 4096]
    return checks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 28, help="elements of the sign-mask tensor (1 GiB fp32)")
    parser.add_argument("--gram-shapes", nargs="+", default=["4096x8192", "8192x8192", "1000x1048576"],
                        help="n x p of J for the Gram timings; the last default is an NTK shape (few samples, "
                             "many parameters) where the kernel splits p across blocks")
    parser.add_argument("--json", help="also write numbers and target checks here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cuda_ext_bench.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # the kernels compute true fp32 products
    sign = sign_rows(args.numel)
    torch.cuda.empty_cache()
    grams = gram_rows([tuple(int(v) for v in shape.split("x")) for shape in args.gram_shapes])
    print(markdown(sign, grams))
    checks = target_checks(sign, grams)
    print("\n" + "\n".join(f"- {'PASS' if c['passed'] else 'MISS'}: {c['name']}: {c['value']}" for c in checks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, sign=sign, gram=grams,
                           checks=checks), f, indent=1)


if __name__ == "__main__":
    main()
