"""Benchmark: Gram K = J1 J2ᵀ (symmetric: upper tiles + mirror, half of torch.mm's FLOPs).

Floor: the FLOPs the kernel must do (n²p symmetric, 2 n1 n2 p cross) at the measured
``torch.mm`` rate, or reading J once at the measured copy bandwidth, whichever is larger.
"""
from _common import COLUMNS, copy_bytes_per_ms, cuda_op, device, header, matmul_flops_per_ms, median_ms, parse, report


def main():
    args = parse(__doc__)
    import torch
    from fasttangent.kernels.gram import gram_torch, gram_triton

    dev = device(args)
    shapes = ([(20, None, 70), (9, 5, 40)] if args.smoke else
              [(1000, None, 2 ** 20), (1000, 500, 2 ** 20), (100, None, 2 ** 23), (4096, None, 2 ** 14)])
    bandwidth = copy_bytes_per_ms(args)
    gram_cuda = cuda_op("gram_cuda", args)
    header(COLUMNS)
    for dtype in (torch.float32, torch.bfloat16):
        rate = matmul_flops_per_ms(dtype, args)
        for n1, n2, p in shapes:
            J1 = torch.randn(n1, p, device=dev).to(dtype)
            J2 = None if n2 is None else torch.randn(n2, p, device=dev).to(dtype)
            flops = n1 * n1 * p if n2 is None else 2 * n1 * n2 * p
            bytes_read = (n1 + (n2 or 0)) * p * J1.element_size()
            floor = max(flops / rate, bytes_read / bandwidth)
            triton_ms = median_ms(lambda: gram_triton(J1, J2), args)
            torch_ms = median_ms(lambda: gram_torch(J1, J2), args)
            cuda_ms = None if gram_cuda is None else median_ms(lambda: gram_cuda(J1, J2), args)
            shape = f"n={n1}, p={p}" if n2 is None else f"n1={n1}, n2={n2}, p={p}"
            report("gram", shape, dtype, triton_ms, torch_ms, cuda_ms, floor)


if __name__ == "__main__":
    main()
