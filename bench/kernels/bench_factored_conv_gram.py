"""Benchmark: flash-style factored conv Gram K[i, j] = Σ_k ⟨A_i A_jᵀ, G_ik G_jkᵀ⟩_F, no T×T stored.

Floor: the kernel's FLOPs (2 n1 n2 T1 T2 (d_in + c·d_out), halved when symmetric) at the
measured ``torch.mm`` rate. The torch composition materializes (n1, n2, T1, T2) twice.
"""
from _common import COLUMNS, device, header, matmul_flops_per_ms, median_ms, parse, report


def main():
    args = parse(__doc__)
    import torch
    from fasttangent.kernels.factored_conv_gram import factored_conv_gram_torch, factored_conv_gram_triton

    dev = device(args)
    # (n, T, d_in, c, d_out): ResNet18 stages on CIFAR (T = H·W positions, d_in = C_in·3·3)
    shapes = ([(3, 19, 7, 2, 5)] if args.smoke else
              [(64, 64, 576, 10, 64), (32, 256, 576, 10, 64), (100, 16, 2304, 10, 512), (128, 64, 1152, 1, 128)])
    header(COLUMNS)
    for dtype in (torch.float32, torch.bfloat16):
        rate = matmul_flops_per_ms(dtype, args)
        for n, T, d_in, c, d_out in shapes:
            A = torch.randn(n, T, d_in, device=dev).to(dtype)
            G = torch.randn(n, c, T, d_out, device=dev).to(dtype)
            flops = n * n * T * T * (d_in + c * d_out)  # half of the 2·n²·T²·(...) of all pairs
            floor = flops / rate
            triton_ms = median_ms(lambda: factored_conv_gram_triton(A, G), args)
            torch_ms = median_ms(lambda: factored_conv_gram_torch(A, G), args)
            shape = f"n={n}, T={T}, d_in={d_in}, c={c}, d_out={d_out}"
            report("factored_conv_gram", shape, dtype, triton_ms, torch_ms, None, floor)


if __name__ == "__main__":
    main()
