"""Benchmark: sign masks, packing (x > 0) into int32 words and counting matches (XOR + popcount).

Floor: the bytes that must move (read x once; write or read ceil(numel/32) words) at the
measured copy bandwidth.
"""
from _common import COLUMNS, copy_bytes_per_ms, cuda_op, device, header, median_ms, parse, report


def main():
    args = parse(__doc__)
    import torch
    from fasttangent.kernels.sign_mask import (count_sign_matches_torch, count_sign_matches_triton, pack_signs_torch,
                                               pack_signs_triton)

    dev = device(args)
    # ReLU outputs of ResNet18 on 100 CIFAR probes (64×32×32 maps), and a large batch
    shapes = [(5, 7, 33)] if args.smoke else [(100, 64, 32, 32), (100, 512, 4, 4), (1000, 64, 32, 32)]
    bandwidth = copy_bytes_per_ms(args)
    pack_cuda, count_cuda = cuda_op("pack_signs_cuda", args), cuda_op("count_sign_matches_cuda", args)
    header(COLUMNS)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            x = torch.randn(shape, device=dev).to(dtype)
            packed = pack_signs_torch(x)
            floor = (x.numel() * x.element_size() + packed.numel() * 4) / bandwidth
            name = "x".join(map(str, shape))
            report("pack_signs", name, dtype, median_ms(lambda: pack_signs_triton(x), args),
                   median_ms(lambda: pack_signs_torch(x), args),
                   None if pack_cuda is None else median_ms(lambda: pack_cuda(x), args), floor)
            report("count_sign_matches", name, dtype, median_ms(lambda: count_sign_matches_triton(x, packed), args),
                   median_ms(lambda: count_sign_matches_torch(x, packed), args),
                   None if count_cuda is None else median_ms(lambda: count_cuda(x, packed), args), floor)


if __name__ == "__main__":
    main()
