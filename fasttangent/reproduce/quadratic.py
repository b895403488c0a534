"""Fig. 4 and Fig. 14 of "Lazy vs hasty": the quadratic model of §4 in closed form, and the
same three data sets (examples 1–3, eqs. 16–19) fitted by a small 2-layer ReLU network with
α-scaling (α small: feature learning; α large: lazy).

    fasttangent reproduce quadratic [--out runs/quadratic] [--quick]

Writes fig4_quadratic.png, fig14_mlp2.png and curves.npz (every plotted curve) to --out.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.optimize

from .. import theory

DESCRIPTION = "Fig. 4 and Fig. 14: the solvable quadratic model of Section 4"

# data sets of §4.4 (the paper gives no numbers; these match the scales of its Fig. 4)
EX1_MU = (2.0, 1.5, 1.0, 0.5)
EX_N, EX_Q, EX_ETA, EX3_SCALE = 20, 3, 1.0, 0.3
SIGMA = 1e-3           # w0 = √σ (1, …, 1), θ0 = σ/2 (§4.4)
LOSS_FRACTION = 0.01   # Fig. 4 time unit: when the training loss reaches 1% of its initial value
MLP_ALPHAS = (0.03, 100.0)        # Fig. 14: feature learning vs lazy
MLP_LR_FRACTIONS = (0.005, 0.1)   # GD step / stability limit at init, per α (≈ gradient flow)
MLP_WIDTH = 128


def examples() -> dict:
    """The three data sets of §4.4, by name."""
    return {
        "ex1": theory.example_learning_order(np.array(EX1_MU)),
        "ex2": theory.example_label_noise(n=EX_N, q=EX_Q, eta=EX_ETA),
        "ex3": theory.example_spurious(n=EX_N, q=EX_Q, scale=EX3_SCALE, eta=EX_ETA),
    }


def _group_errors(ex, err):
    """err (T, n) -> {group: (T,) mean squared error over the group}."""
    return {name: err[:, idx].mean(axis=1) for name, idx in ex.groups.items()}


def _time_to_loss_fraction(ex, w0, modes, regime, fraction):
    """First time the closed-form training loss falls to ``fraction`` of its initial value."""
    def log_ratio(t):
        err = theory.per_example_squared_error(ex.X, ex.y, theory.quadratic_flow(ex.X, ex.y, w0, [0.0, t], regime, modes=modes))
        return np.log(err[1].sum() / err[0].sum()) - np.log(fraction)

    t_hi = 1.0
    while log_ratio(t_hi) > 0:  # gradient flow: the loss decreases monotonically
        t_hi *= 2
    return scipy.optimize.brentq(log_ratio, 0.0, t_hi, xtol=1e-10 * t_hi)


def theory_curves(sigma: float = SIGMA, points: int = 400) -> dict:
    """Closed-form per-group squared errors for Fig. 4, both regimes, every example.

    Time is rescaled per regime (t / T, T = time to 1% of the initial loss), since the two
    regimes' time scales differ by orders of magnitude (the paper's "arbitrary scale").
    Returns {f"{ex}_{regime}_{name}": array}, names "time", "scaled_time", "loss", groups.
    """
    curves = {}
    for ex_name, ex in examples().items():
        modes = theory.quadratic_modes(ex.X, ex.y)
        w0 = np.sqrt(sigma) * np.ones(ex.X.shape[1])
        for regime in theory.REGIMES:
            scale = _time_to_loss_fraction(ex, w0, modes, regime, LOSS_FRACTION)
            times = np.linspace(0.0, 2.0 * scale, points)
            err = theory.per_example_squared_error(ex.X, ex.y, theory.quadratic_flow(ex.X, ex.y, w0, times, regime, modes=modes))
            key = f"{ex_name}_{regime}"
            curves[f"{key}_time"] = times
            curves[f"{key}_scaled_time"] = times / scale
            curves[f"{key}_loss"] = err.mean(axis=1)
            for name, values in _group_errors(ex, err).items():
                curves[f"{key}_{name}"] = values
    return curves


def _initial_ntk_max_eigenvalue(net, X) -> float:
    """λ_max of the trace NTK Gram K_ij = ∇f(x_i)·∇f(x_j) at the current parameters (n ≤ ~100)."""
    import torch

    params = [p for p in net.parameters() if p.requires_grad]
    rows = []
    for x in X:
        grads = torch.autograd.grad(net(x[None])[0, 0], params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows).double()
    return float(torch.linalg.eigvalsh(J @ J.T)[-1])


def train_mlp2(ex, alpha: float, *, lr_fraction: float, width: int, seed: int, max_steps: int,
               stop_fraction: float = 1e-3) -> np.ndarray:
    """Full-batch GD on ½·mean squared error of f^α for a d → width → 1 ReLU network.

    The network is wrapped in ``AlphaScaled(center=True)`` (output 0 at init, like the
    quadratic model's small init) and trained with η/α², η = ``lr_fraction``·2n/λ_max(K0)
    (K0 the initial NTK Gram; 2n/λ_max is GD's stability limit for the linearized model,
    the same for every α since f^α's NTK is α²K). Stops when the loss falls to
    ``stop_fraction`` of its initial value, or after ``max_steps``.
    Returns per-example squared errors (steps + 1, n), before every step and after the last.
    """
    import torch
    from torch import nn

    from ..alpha import AlphaScaled, alpha_lr

    torch.manual_seed(seed)
    X = torch.tensor(ex.X, dtype=torch.float32)
    y = torch.tensor(ex.y, dtype=torch.float32)
    net = nn.Sequential(nn.Linear(X.shape[1], width), nn.ReLU(), nn.Linear(width, 1))
    lr = lr_fraction * 2 * X.shape[0] / _initial_ntk_max_eigenvalue(net, X)
    with torch.no_grad():
        # f_θ0(X) computed before any step equals model.initial_output(X), without the
        # torch.func import that initial_output pulls in (seconds on a loaded CPU)
        f0 = net(X)
    model = AlphaScaled(net, alpha, center=True)
    opt = torch.optim.SGD(net.parameters(), lr=alpha_lr(lr, alpha))
    errors = []
    for _ in range(max_steps + 1):
        err = (model(X, f0=f0)[:, 0] - y) ** 2
        errors.append(err.detach().numpy().astype(np.float64))
        if errors[-1].mean() <= stop_fraction * errors[0].mean():
            break
        opt.zero_grad(set_to_none=True)
        (0.5 * err.mean()).backward()
        opt.step()
    return np.array(errors)


def mlp_curves(alphas=MLP_ALPHAS, lr_fractions=MLP_LR_FRACTIONS, *, width: int = MLP_WIDTH, seed: int = 0,
               max_steps: int = 4000) -> dict:
    """Fig. 14 curves: per-group squared errors of the 2-layer network, each α, each example.

    ``lr_fractions[k]`` is the step of the run with ``alphas[k]`` as a fraction of GD's
    stability limit at init (see :func:`train_mlp2`). Small α needs a smaller fraction: its
    NTK grows during training, and GD must stay close to gradient flow for the equal-loss
    comparison to mean anything. Returns {f"{ex}_alpha{α}_{name}": array}, names "loss"
    (mean squared error), "step", and the groups.
    """
    curves = {}
    for ex_name, ex in examples().items():
        for alpha, lr_fraction in zip(alphas, lr_fractions):
            err = train_mlp2(ex, alpha, lr_fraction=lr_fraction, width=width, seed=seed, max_steps=max_steps)
            key = f"{ex_name}_alpha{alpha:g}"
            curves[f"{key}_step"] = np.arange(len(err))
            curves[f"{key}_loss"] = err.mean(axis=1)
            for name, values in _group_errors(ex, err).items():
                curves[f"{key}_{name}"] = values
    return curves


_TITLES = {
    "ex1": "Ex. 1: per-example error (order flips)",
    "ex2": "Ex. 2: label noise",
    "ex3": "Ex. 3: spurious feature",
}
_GROUP_LABELS = {"clean": "clean", "noisy": "noisy", "spurious": "spurious (majority)",
                 "no_spurious": "no spur. (minority)"}


def _group_names(ex_name):
    return list(examples()[ex_name].groups)


def plot_fig4(curves: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    styles = {"linear": "-", "nonlinear": "--"}
    for ax, ex_name in zip(axes, ("ex1", "ex2", "ex3")):
        for g, name in enumerate(_group_names(ex_name)):
            for regime, ls in styles.items():
                key = f"{ex_name}_{regime}"
                values = curves[f"{key}_{name}"]
                # example 1's errors span two decades: show each relative to its start
                values = values / values[0] if ex_name == "ex1" else values
                ax.plot(curves[f"{key}_scaled_time"], values, ls, color=f"C{g}",
                        label=f"{_GROUP_LABELS.get(name, name)}, {regime}")
        ax.set_title(_TITLES[ex_name])
        ax.set_xlabel("time / T (T: loss at 1% of initial, per regime)")
        ax.set_ylabel("squared error / initial" if ex_name == "ex1" else "group MSE")
        ax.legend(fontsize=7)
    fig.suptitle(f"Quadratic model, closed form (Prop. 1; σ = {SIGMA:g}); solid: linear, dashed: non-linear", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_fig14(curves: dict, alphas, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    styles = ["--", "-", ":"]
    for ax, ex_name in zip(axes, ("ex1", "ex2", "ex3")):
        for g, name in enumerate(_group_names(ex_name)):
            for alpha, ls in zip(sorted(alphas), styles):
                key = f"{ex_name}_alpha{alpha:g}"
                values = curves[f"{key}_{name}"]
                values = values / values[0] if ex_name == "ex1" else values
                loss = curves[f"{key}_loss"]
                ax.plot(loss / loss[0], values, ls, color=f"C{g}",
                        label=f"{_GROUP_LABELS.get(name, name)}, α={alpha:g}")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_title(_TITLES[ex_name])
        ax.set_xlabel("training loss / initial loss (decreasing →)")
        ax.set_ylabel("squared error / initial" if ex_name == "ex1" else "group MSE")
        ax.legend(fontsize=7)
    fig.suptitle(f"2-layer ReLU network (width {MLP_WIDTH}), full-batch GD with lr/α², compared at equal training loss; "
                 f"dashed: α = {min(alphas):g}, solid: α = {max(alphas):g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fasttangent reproduce quadratic", description=DESCRIPTION)
    parser.add_argument("--out", default="runs/quadratic", help="output folder (default: runs/quadratic)")
    parser.add_argument("--quick", action="store_true", help="at most 150 network steps per run (a smoke run)")
    parser.add_argument("--alphas", type=float, nargs=2, default=MLP_ALPHAS, metavar=("SMALL", "LARGE"),
                        help=f"α of the feature-learning and lazy network runs (default: {MLP_ALPHAS[0]:g} {MLP_ALPHAS[1]:g})")
    parser.add_argument("--lr-fractions", type=float, nargs=2, default=MLP_LR_FRACTIONS, metavar=("SMALL", "LARGE"),
                        help="GD step of each run as a fraction of the stability limit 2n/λ_max(NTK at init) "
                             f"(default: {MLP_LR_FRACTIONS[0]:g} {MLP_LR_FRACTIONS[1]:g})")
    parser.add_argument("--max-steps", type=int, default=4000, help="cap on GD steps per network run (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="network initialization seed (default 0)")
    args = parser.parse_args(argv)
    if args.alphas[0] >= args.alphas[1]:
        parser.error(f"--alphas must be SMALL LARGE with SMALL < LARGE, got {args.alphas}")
    max_steps = min(args.max_steps, 150) if args.quick else args.max_steps

    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    curves4 = theory_curves()
    print(f"closed-form curves: {time.time() - start:.1f}s")
    curves14 = mlp_curves(tuple(args.alphas), tuple(args.lr_fractions), seed=args.seed, max_steps=max_steps)
    print(f"network runs (at most {max_steps} steps each): {time.time() - start:.1f}s")

    plot_fig4(curves4, os.path.join(args.out, "fig4_quadratic.png"))
    plot_fig14(curves14, args.alphas, os.path.join(args.out, "fig14_mlp2.png"))
    np.savez_compressed(os.path.join(args.out, "curves.npz"),
                        **{f"fig4_{k}": v for k, v in curves4.items()},
                        **{f"fig14_{k}": v for k, v in curves14.items()})
    print(f"wrote {args.out}/fig4_quadratic.png, fig14_mlp2.png, curves.npz in {time.time() - start:.1f}s")
    return 0
