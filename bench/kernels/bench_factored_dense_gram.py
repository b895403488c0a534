"""Benchmark: fused factored dense Gram K = (A1 A2ᵀ) ⊙ Σ_k G1_k G2_kᵀ in one kernel.

Floor: the kernel's FLOPs (2 n1 n2 (d_in + c·d_out), halved when symmetric) at the measured
``torch.mm`` rate, or reading A and G once at the copy bandwidth, whichever is larger. The
torch composition writes and rereads both n1×n2 factors.
"""
from _common import COLUMNS, copy_bytes_per_ms, device, header, matmul_flops_per_ms, median_ms, parse, report


def main():
    args = parse(__doc__)
    import torch
    from fasttangent.kernels.factored_dense_gram import factored_dense_gram_torch, factored_dense_gram_triton

    dev = device(args)
    # (n1, n2 or None, d_in, c, d_out): the last Linear of a ResNet18 probe, a wide MLP layer
    shapes = ([(19, None, 21, 3, 18), (9, 5, 7, 2, 6)] if args.smoke else
              [(1000, None, 512, 10, 1), (100, None, 512, 10, 10), (2048, None, 1024, 1, 1024),
               (2048, 1024, 1024, 4, 512)])
    bandwidth = copy_bytes_per_ms(args)
    header(COLUMNS)
    for dtype in (torch.float32, torch.bfloat16):
        rate = matmul_flops_per_ms(dtype, args)
        for n1, n2, d_in, c, d_out in shapes:
            def draw(*shape):
                return torch.randn(*shape, device=dev).to(dtype)
            A1, G1 = draw(n1, d_in), draw(n1, c, d_out)
            A2, G2 = (None, None) if n2 is None else (draw(n2, d_in), draw(n2, c, d_out))
            pairs = n1 * n1 / 2 if n2 is None else n1 * n2
            flops = 2 * pairs * (d_in + c * d_out)
            bytes_read = (n1 + (n2 or 0)) * (d_in + c * d_out) * A1.element_size() + n1 * (n2 or n1) * 4
            floor = max(flops / rate, bytes_read / bandwidth)
            triton_ms = median_ms(lambda: factored_dense_gram_triton(A1, G1, A2, G2), args)
            torch_ms = median_ms(lambda: factored_dense_gram_torch(A1, G1, A2, G2), args)
            shape = f"n1={n1}, n2={n2 or n1}, d_in={d_in}, c={c}, d_out={d_out}"
            report("factored_dense_gram", shape, dtype, triton_ms, torch_ms, None, floor)


if __name__ == "__main__":
    main()
