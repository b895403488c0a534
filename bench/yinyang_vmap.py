"""Speed of the vectorized yin-yang runs (torch.func) against a plain Python loop.

    .venv/bin/python bench/yinyang_vmap.py [--runs 100] [--steps 30] [--alpha 1]

Both train the same R networks (MLP 2→60→60→60→1, 100 points each) by full-batch GD on
the summed logistic loss of f^α for the same number of steps:
- loop: one ``AlphaScaled`` module and ``torch.optim.SGD`` per run, f_θ0 cached;
- vmap: ``stack_module_state`` + ``vmap(grad_and_value(...))`` over ``functional_call``,
  the step used by ``fasttangent reproduce yinyang``.
Prints seconds per step of each, the speed-up, and the largest parameter difference.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from fasttangent.alpha import AlphaScaled, alpha_lr
from fasttangent.reproduce.yinyang import YinYangSetup, _initial_state, _make_step


def loop(models, X, Y, alpha, lr, steps):
    nets = [AlphaScaled(copy.deepcopy(m), alpha) for m in models]
    f0 = [net.initial_output(x).squeeze(-1) for net, x in zip(nets, X)]
    opts = [torch.optim.SGD(net.parameters(), lr=alpha_lr(lr, alpha)) for net in nets]
    start = time.perf_counter()
    for _ in range(steps):
        for net, opt, x, y, f in zip(nets, opts, X, Y, f0):
            loss = F.binary_cross_entropy_with_logits(net(x, f0=f.unsqueeze(-1)).squeeze(-1), y, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return (time.perf_counter() - start) / steps, [dict(net.model.named_parameters()) for net in nets]


def vectorized(params, template, X, Y, alpha, lr, steps):
    from torch.func import functional_call, vmap
    with torch.no_grad():
        f0 = vmap(lambda p, x: functional_call(template, p, (x,)).squeeze(-1))(params, X)
    step = _make_step(template, alpha, "sum")
    params = {k: v.clone() for k, v in params.items()}
    start = time.perf_counter()
    for _ in range(steps):
        grads, _ = step(params, X, Y, f0)
        params = {k: v - lr / alpha**2 * grads[k] for k, v in params.items()}
    return (time.perf_counter() - start) / steps, params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = YinYangSetup(runs=args.runs)
    params, X, Y, template, models = _initial_state(setup)
    vectorized(params, template, X, Y, args.alpha, setup.lr, 2)       # warm-up
    loop(models[:2], X[:2], Y[:2], args.alpha, setup.lr, 2)
    t_vmap, p_vmap = vectorized(params, template, X, Y, args.alpha, setup.lr, args.steps)
    t_loop, p_loop = loop(models, X, Y, args.alpha, setup.lr, args.steps)
    diff = max((p_loop[r][k] - p_vmap[k][r]).abs().max().item() for r in range(args.runs) for k in p_vmap)
    print(f"runs={args.runs} steps={args.steps} alpha={args.alpha:g} threads={torch.get_num_threads()}")
    print(f"loop : {t_loop * 1e3:8.2f} ms/step")
    print(f"vmap : {t_vmap * 1e3:8.2f} ms/step")
    print(f"speed-up {t_loop / t_vmap:.1f}x, max |Δθ| between the two = {diff:.2e}")


if __name__ == "__main__":
    main()
