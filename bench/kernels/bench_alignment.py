"""Benchmark: alignment terms (⟨K1,K2⟩_F, ‖K1‖², ‖K2‖²) in one pass, and the centered variant
(a margins pass, then the fused pass).

Floor: reading both Grams once (twice when centered) at the measured copy bandwidth.
"""
from _common import COLUMNS, copy_bytes_per_ms, device, header, median_ms, parse, report


def main():
    args = parse(__doc__)
    import torch
    from fasttangent.kernels.alignment import alignment_terms_torch, alignment_terms_triton

    dev = device(args)
    # full (n·c)² NTKs: 100 probes × 10 outputs, 600 × 1, and a large 8192² Gram
    sizes = [37] if args.smoke else [1000, 600, 8192]
    bandwidth = copy_bytes_per_ms(args)
    header(COLUMNS)
    for dtype in (torch.float32, torch.bfloat16):
        for m in sizes:
            K1 = torch.randn(m, m, device=dev).to(dtype)
            K2 = torch.randn(m, m, device=dev).to(dtype)
            for centered in (False, True):
                reads = 2 if centered else 1
                floor = reads * 2 * K1.numel() * K1.element_size() / bandwidth
                report("alignment_terms" + (" centered" if centered else ""), f"m={m}", dtype,
                       median_ms(lambda: alignment_terms_triton(K1, K2, centered), args),
                       median_ms(lambda: alignment_terms_torch(K1, K2, centered), args), None, floor)


if __name__ == "__main__":
    main()
