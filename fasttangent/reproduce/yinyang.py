"""Fig. 1 of the paper: the yin-yang task trained with α = 1 (non-linear) and α = 100 (lazy).

``fasttangent reproduce yinyang [--out DIR] [--runs N] [--quick]``

Protocol (SPEC §3 "yinyang"): R independent runs, each a new initialization of the MLP
2→60→60→60→1 (ReLU) and a new set of 100 training points uniform on [−1, 1]²
(``fasttangent.tasks.yinyang`` describes the labels). Every run is trained by full-batch
gradient descent on the logistic loss summed over the training set (the paper's eq. 1),
learning rate 0.01/α², for α = 1 and α = 100 from the same initial parameters.

All R runs of one α are trained at once: their parameters are stacked
(``torch.func.stack_module_state``) and one step is
``vmap(grad_and_value(objective))`` over ``functional_call`` of the network, so the R
small networks cost a few batched matrix products per layer instead of R Python-level
forward/backward passes (``bench/yinyang_vmap.py`` measures the speed-up).

Recorded:
- (b) each run's training loss (mean over its examples) at every iteration up to
  ``curve_steps``;
- (c–e) for each training-loss threshold (0.5, 0.4, 0.3), each run's per-example loss on a
  ``grid`` × ``grid`` grid of the square at the first iterate whose training loss is at
  most the threshold; runs that do not reach a threshold within ``max_steps`` are left out
  of that panel (the count is reported). Δloss = loss_{α=1} − loss_{α=100} is averaged over
  the runs that reached the threshold for both α; red (Δ > 0) is where the linearized run
  has the lower test loss;
- (f) sign similarity, NTK alignment and representation alignment of f_θ against θ0
  (``fasttangent.LinearityProbe`` on the run's 100 training points) each time the run's
  training loss falls below log(2)·0.96^k, for the first ``probe_runs`` runs.

Outputs in ``--out``: fig1.png, curves.npz (loss curves, mean Δ maps, crossing steps),
metrics.json (probe rows), summary.json (claims checked, timings).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from ..tasks.yinyang import EYE_RADIUS, eye_mask, yinyang_dataset, yinyang_grid, yinyang_labels, yinyang_mlp

DESCRIPTION = "Fig. 1: yin-yang task, alpha = 1 vs 100"


@dataclass
class YinYangSetup:
    """The experiment's settings; the defaults are the paper's."""

    runs: int = 100
    n_train: int = 100
    alphas: tuple = (1.0, 100.0)
    lr: float = 0.01
    loss_reduction: str = "sum"            # the paper's eq. 1; "mean" divides the step by n
    thresholds: tuple = (0.5, 0.4, 0.3)
    curve_steps: int = 500                 # all runs train this long (panel b)
    max_steps: int = 3000                  # runs short of the last threshold continue up to this
    grid: int = 200
    probe_runs: int = 20                   # runs whose linearity metrics are measured
    probe_decay: float = 0.96
    width: int = 60
    depth: int = 3
    eye_radius: float = EYE_RADIUS
    seed: int = 0
    grid_chunk: int = 8                    # runs evaluated on the grid at once (memory)


AHEAD_BY = 50      # "after the first iterations": α = 1 must be ahead from this step on

QUICK = dict(runs=12, curve_steps=300, max_steps=1500, grid=80, probe_runs=4)


# ---------------------------------------------------------------------------------------
# vectorized training


def _initial_state(setup: YinYangSetup):
    """Stacked initial parameters of the R networks, their data, and a template module."""
    models, xs, ys = [], [], []
    for run in range(setup.runs):
        torch.manual_seed(setup.seed * 100_003 + run)
        models.append(yinyang_mlp(setup.width, setup.depth))
        x, y = yinyang_dataset(setup.n_train, torch.Generator().manual_seed(setup.seed * 100_003 + run),
                               setup.eye_radius)
        xs.append(x)
        ys.append(y)
    params, _ = stack_module_state(models)
    template = copy.deepcopy(models[0]).to("meta")
    return {k: v.detach() for k, v in params.items()}, torch.stack(xs), torch.stack(ys), template, models


def _scaled_output(template, params, x, f0, alpha):
    """f^α(x) = f_θ0(x) + α (f_θ(x) − f_θ0(x)) of one network; x (n, 2) -> (n,)."""
    return f0 + alpha * (functional_call(template, params, (x,)).squeeze(-1) - f0)


def _make_step(template, alpha: float, reduction: str):
    """vmap over runs of (gradient of the objective, per-example mean loss)."""
    def objective(params, x, y, f0):
        losses = F.binary_cross_entropy_with_logits(_scaled_output(template, params, x, f0, alpha), y,
                                                    reduction="none")
        total = losses.sum() if reduction == "sum" else losses.mean()
        return total, losses.mean().detach()
    return vmap(grad_and_value(objective, has_aux=True))


def _grid_losses(template, params, f0, alpha, grid_x, grid_y):
    """Per-example loss (r, G) of r stacked networks on the grid, given their f_θ0 (r, G)."""
    out = vmap(lambda p, f: _scaled_output(template, p, grid_x, f, alpha))(params, f0)
    return F.binary_cross_entropy_with_logits(out, grid_y.expand_as(out), reduction="none")


def _run_alpha(setup, alpha, init_params, X, Y, template, grid_x, grid_y, f0_train, f0_grid, probes, log):
    """Train all runs of one α; return curves, crossing steps, grid loss sums, probe rows."""
    R, T = setup.runs, setup.curve_steps
    lr = setup.lr / alpha**2
    step_fn = _make_step(template, alpha, setup.loss_reduction)
    thresholds = list(setup.thresholds)
    params = {k: v.clone() for k, v in init_params.items()}
    active = torch.arange(R)                      # runs still trained (all, until curve_steps)
    curves = np.full((T + 1, R), np.nan, dtype=np.float32)
    crossing = np.full((len(thresholds), R), -1, dtype=np.int64)
    grid_maps = np.full((len(thresholds), R, len(grid_y)), np.nan, dtype=np.float32)
    probed = np.isin(np.arange(R), list(probes))
    level = np.zeros(R, dtype=np.int64)           # next index k of log(2)·decay^k per probed run
    rows = []
    module = copy.deepcopy(template)
    step = 0
    while True:
        grads, (_, train_loss) = step_fn(params, X[active], Y[active], f0_train[active])
        loss_np = train_loss.numpy()
        if step <= T:
            curves[step, active.numpy()] = loss_np
        runs_np = active.numpy()
        # (c–e): grid losses at the first iterate reaching each threshold, before its update
        for j, thr in enumerate(thresholds):
            new = np.flatnonzero((loss_np <= thr) & (crossing[j, runs_np] < 0))
            for start in range(0, len(new), setup.grid_chunk):
                local = new[start:start + setup.grid_chunk]
                runs = runs_np[local]
                sub = {k: v[torch.from_numpy(local)] for k, v in params.items()}
                with torch.no_grad():
                    losses = _grid_losses(template, sub, f0_grid[runs], alpha, grid_x, grid_y)
                grid_maps[j, runs] = losses.numpy()
                crossing[j, runs] = step
        # (f): linearity metrics when a probed run's loss passes log(2)·decay^k
        due = np.flatnonzero(probed[runs_np] & ((loss_np < math.log(2) * setup.probe_decay ** level[runs_np])
                                                | (step == 0)))
        for i in due:
            r, loss_i = int(runs_np[i]), float(loss_np[i])
            if step > 0:
                level[r] = max(level[r] + 1, math.floor(math.log(loss_i / math.log(2)) / math.log(setup.probe_decay)) + 1)
            module.load_state_dict({k: v[i] for k, v in params.items()}, assign=True)
            rows.append({"alpha": alpha, "run": r, "step": step, "train_loss": loss_i,
                         **{m: float(v) for m, v in probes[r].measure(module).items()}})
        done = crossing[-1, active.numpy()] >= 0
        if step >= T:
            if done.all() or step >= setup.max_steps:
                break
            if done.any():                        # past the curves, keep only runs short of the last threshold
                keep = torch.from_numpy(~done)
                active = active[keep]
                params = {k: v[keep] for k, v in params.items()}
                grads = {k: v[keep] for k, v in grads.items()}
        params = {k: v - lr * grads[k] for k, v in params.items()}
        step += 1
        if step % 100 == 0:
            log(f"alpha={alpha:g} step {step}: mean loss {loss_np.mean():.4f}, {len(active)} runs active")
    return curves, crossing, grid_maps, rows


def _train_one_alpha(setup: YinYangSetup, alpha: float, log=print, threads: int | None = None) -> dict:
    """All runs of one α, from scratch (the initial state is a function of the seed, so
    separate processes start every α from the same parameters and data)."""
    from ..metrics import LinearityProbe
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    init_params, X, Y, template, models = _initial_state(setup)
    grid_x = yinyang_grid(setup.grid)
    grid_y = yinyang_labels(grid_x, setup.eye_radius)
    with torch.no_grad():
        f0_train = vmap(lambda p, x: functional_call(template, p, (x,)).squeeze(-1))(init_params, X)
        f0_grid = torch.cat([                                         # (R, G)
            vmap(lambda p: functional_call(template, p, (grid_x,)).squeeze(-1))(
                {k: v[start:start + setup.grid_chunk] for k, v in init_params.items()})
            for start in range(0, setup.runs, setup.grid_chunk)])
    probes = {r: LinearityProbe(models[r], X[r]) for r in range(min(setup.probe_runs, setup.runs))}
    curves, crossing, grid_maps, rows = _run_alpha(setup, alpha, init_params, X, Y, template, grid_x, grid_y,
                                                   f0_train, f0_grid, probes, log)
    seconds = time.perf_counter() - started
    log(f"alpha={alpha:g}: {seconds:.1f} s")
    return {"curves": curves, "crossing": crossing, "grid_maps": grid_maps, "rows": rows, "seconds": seconds,
            "X": X.numpy(), "Y": Y.numpy(), "grid_y": grid_y.numpy()}


def _print(message: str) -> None:
    print(message, flush=True)


def run_experiment(setup: YinYangSetup, log=print, workers: int = 1) -> dict:
    """Train every α for every run; return the raw results (see ``summarize``).

    ``workers`` > 1 trains the α values in separate processes with one thread each: on a
    few cores this beats intra-op threads, whose synchronization costs more than these
    small matrix products gain (measured: 2 threads were 3.5× *slower* than 1 on a loaded
    2-core machine)."""
    started = time.perf_counter()
    if workers > 1 and len(setup.alphas) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(workers, len(setup.alphas)), mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(_train_one_alpha, setup, alpha, _print, 1) for alpha in setup.alphas]
            per_alpha = [job.result() for job in jobs]
    else:
        per_alpha = [_train_one_alpha(setup, alpha, log) for alpha in setup.alphas]
    first = per_alpha[0]
    results = {"setup": dataclasses.asdict(setup), "X": first["X"], "Y": first["Y"], "grid_y": first["grid_y"]}
    for alpha, res in zip(setup.alphas, per_alpha):
        results[alpha] = {k: res[k] for k in ("curves", "crossing", "grid_maps", "rows")}
    results["timings"] = {**{f"alpha={a:g}": r["seconds"] for a, r in zip(setup.alphas, per_alpha)},
                          "total": time.perf_counter() - started, "workers": workers}
    return results


# ---------------------------------------------------------------------------------------
# analysis


def summarize(results: dict) -> tuple[dict, np.ndarray]:
    """Mean Δ maps per threshold and the paper's qualitative claims, with their numbers."""
    setup = YinYangSetup(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["setup"].items()})
    lin, non = results[max(setup.alphas)], results[min(setup.alphas)]
    grid_x = yinyang_grid(setup.grid)
    eyes = eye_mask(grid_x, setup.eye_radius).numpy()
    summary = {"thresholds": list(setup.thresholds), "runs": setup.runs, "probe_runs": min(setup.probe_runs, setup.runs)}
    delta_maps, reached = [], []
    for j, thr in enumerate(setup.thresholds):
        both = (non["crossing"][j] >= 0) & (lin["crossing"][j] >= 0)
        reached.append({"alpha=1": int((non["crossing"][j] >= 0).sum()), "alpha=100": int((lin["crossing"][j] >= 0).sum()),
                        "both": int(both.sum())})
        delta = (non["grid_maps"][j, both] - lin["grid_maps"][j, both]).mean(axis=0)
        delta_maps.append(delta)
        summary[f"delta@{thr}"] = {
            "mean": float(delta.mean()), "std": float(delta.std()), "min": float(delta.min()), "max": float(delta.max()),
            "eyes_mean": float(delta[eyes].mean()), "outside_eyes_mean": float(delta[~eyes].mean()),
            "fraction_positive": float((delta > 0).mean()),
            "median_crossing_step": {"alpha=1": float(np.median(non["crossing"][j][non["crossing"][j] >= 0])),
                                     "alpha=100": float(np.median(lin["crossing"][j][lin["crossing"][j] >= 0]))}}
    summary["reached"] = reached
    mean_non, mean_lin = np.nanmean(non["curves"], axis=1), np.nanmean(lin["curves"], axis=1)
    behind = np.flatnonzero(~(mean_non < mean_lin))
    # from this step on, the mean training loss of α = 1 stays below that of α = 100
    ahead_from = int(behind[-1]) + 1 if len(behind) else 0
    summary["curves"] = {"alpha1_ahead_from_step": ahead_from, "steps": len(mean_non) - 1,
                         "mean_loss_alpha1_alpha100": {str(t): [float(mean_non[t]), float(mean_lin[t])]
                                                       for t in (1, 3, 10, 30, 100, 300, 1000) if t < len(mean_non)}}
    names = ("sign_similarity", "ntk_alignment", "repr_alignment")
    for name, res in (("alpha=1", non), ("alpha=100", lin)):
        rows = res["rows"]
        if rows:
            _, mean_curves = _binned_metrics(rows, setup.probe_decay)
            # the mean over the probed runs, per loss level, as plotted in panel (f)
            summary[f"metrics mean-curve min {name}"] = {m: float(min(mean_curves[m])) for m in names}
            summary[f"metrics worst-run min {name}"] = {m: float(min(r[m] for r in rows)) for m in names}
        else:
            summary[f"metrics mean-curve min {name}"] = summary[f"metrics worst-run min {name}"] = {}
    last = len(setup.thresholds) - 1
    s = summary
    lin_min, non_min = s["metrics mean-curve min alpha=100"], s["metrics mean-curve min alpha=1"]
    summary["claims"] = {
        f"alpha=1 trains faster after the first iterations (mean loss lower from step {AHEAD_BY} on)":
            s["curves"]["alpha1_ahead_from_step"] <= min(AHEAD_BY, s["curves"]["steps"]),
        "alpha=100 keeps sign similarity and NTK alignment > 0.98 (mean over probed runs)":
            bool(lin_min and lin_min["sign_similarity"] > 0.98 and lin_min["ntk_alignment"] > 0.98),
        "alpha=1 sign similarity and NTK alignment fall below 0.9 (mean over probed runs)":
            bool(non_min and non_min["sign_similarity"] < 0.9 and non_min["ntk_alignment"] < 0.9),
        "delta maps are not uniform (both signs present)":
            all(s[f"delta@{t}"]["min"] < 0 < s[f"delta@{t}"]["max"] for t in setup.thresholds),
        "the small disks favour the linear run (mean delta in the disks > 0 and > outside)":
            all(s[f"delta@{t}"]["eyes_mean"] > max(0.0, s[f"delta@{t}"]["outside_eyes_mean"]) for t in setup.thresholds),
        f"every run reached {setup.thresholds[last]} for both alphas": reached[last]["both"] == setup.runs,
    }
    return summary, np.stack(delta_maps)


def _binned_metrics(rows, decay):
    """Mean of each metric over runs, per loss level k (rows binned by log(2)·decay^k)."""
    out = {}
    for row in rows:
        k = 0 if row["train_loss"] >= math.log(2) else math.floor(math.log(row["train_loss"] / math.log(2)) / math.log(decay))
        out.setdefault(k, []).append(row)
    levels = sorted(out)
    loss = [np.mean([r["train_loss"] for r in out[k]]) for k in levels]
    return loss, {m: [np.mean([r[m] for r in out[k]]) for k in levels]
                  for m in ("sign_similarity", "ntk_alignment", "repr_alignment")}


def plot_figure(results: dict, delta_maps: np.ndarray, path: Path) -> None:
    """The paper's Fig. 1 panels (a)–(e) and a panel (f) of linearity metrics."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, TwoSlopeNorm

    setup = results["setup"]
    alphas = setup["alphas"]
    lin, non = results[max(alphas)], results[min(alphas)]
    G = setup["grid"]
    fig, axes = plt.subplots(1, 6, figsize=(22, 3.6), gridspec_kw={"wspace": 0.3})
    extent = (-1, 1, -1, 1)

    ax = axes[0]
    ax.imshow(results["grid_y"].reshape(G, G), origin="lower", extent=extent,
              cmap=ListedColormap(["#c6dbef", "#fdd0a2"]), interpolation="nearest")
    x, y = results["X"][0], results["Y"][0]
    ax.scatter(x[:, 0], x[:, 1], c=np.where(y > 0.5, "#d94801", "#2171b5"), s=12, edgecolors="k", linewidths=0.3)
    ax.set(title="(a) task + one dataset", xticks=[], yticks=[])

    ax = axes[1]
    steps = np.arange(non["curves"].shape[0])
    for res, alpha, color in ((lin, max(alphas), "tab:red"), (non, min(alphas), "tab:blue")):
        c = res["curves"]
        ax.plot(steps[1:], np.nanmean(c, axis=1)[1:], color=color,
                label=f"{'linearized' if alpha == max(alphas) else 'non-linear'} (α={alpha:g})")
        lo, hi = np.nanpercentile(c, [10, 90], axis=1)
        ax.fill_between(steps[1:], lo[1:], hi[1:], color=color, alpha=0.15, linewidth=0)
    for thr, name in zip(setup["thresholds"], "cde"):
        ax.axhline(thr, color="gray", lw=0.7, ls="--")
        ax.text(1.2, thr, f"({name})", va="bottom", fontsize=8, color="gray")
    ax.set(xscale="log", xlabel="GD iterations", ylabel="training loss", title="(b) training loss (mean, 10–90%)",
           ylim=(0, 0.75))
    ax.legend(fontsize=7, loc="lower left")

    bound = float(np.abs(delta_maps).max())
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
    for ax, thr, name, delta in zip(axes[2:5], setup["thresholds"], "cde", delta_maps):
        im = ax.imshow(delta.reshape(G, G), origin="lower", extent=extent, cmap="RdBu_r", norm=norm)
        for cx in (-0.5, 0.5):
            ax.add_patch(matplotlib.patches.Circle((cx, 0), setup["eye_radius"], fill=False, lw=0.5, ls=":"))
        ax.set(title=f"({name}) Δloss(x_test) at\ntraining loss={thr}", xticks=[], yticks=[])
    fig.colorbar(im, ax=list(axes[2:5]), orientation="horizontal", fraction=0.06, pad=0.04, aspect=50,
                 label="Δloss = loss(α=1) − loss(α=100); red: the linearized run is better")

    ax = axes[5]
    styles = {"sign_similarity": "-", "ntk_alignment": "--", "repr_alignment": ":"}
    for res, alpha, color in ((lin, max(alphas), "tab:red"), (non, min(alphas), "tab:blue")):
        if res["rows"]:
            loss, metrics = _binned_metrics(res["rows"], setup["probe_decay"])
            for m, values in metrics.items():
                ax.plot(loss, values, styles[m], color=color)
    handles = [matplotlib.lines.Line2D([], [], color="k", ls=ls, label=m.replace("_", " ")) for m, ls in styles.items()]
    handles += [matplotlib.lines.Line2D([], [], color=c, label=f"α={a:g}")
                for a, c in ((max(alphas), "tab:red"), (min(alphas), "tab:blue"))]
    ax.invert_xaxis()
    ax.set(xlabel="training loss", title=f"(f) linearity metrics, mean of {min(setup['probe_runs'], setup['runs'])} runs")
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def save(results: dict, summary: dict, delta_maps: np.ndarray, out: Path) -> None:
    setup = results["setup"]
    arrays = {"delta_maps": delta_maps, "thresholds": np.array(setup["thresholds"]), "grid_y": results["grid_y"],
              "example_x": results["X"][0], "example_y": results["Y"][0]}
    for alpha in setup["alphas"]:
        arrays[f"curves_alpha{alpha:g}"] = results[alpha]["curves"]
        arrays[f"crossing_alpha{alpha:g}"] = results[alpha]["crossing"]
        arrays[f"mean_grid_loss_alpha{alpha:g}"] = np.nanmean(results[alpha]["grid_maps"], axis=1)
    np.savez_compressed(out / "curves.npz", **arrays)
    (out / "metrics.json").write_text(json.dumps([r for a in setup["alphas"] for r in results[a]["rows"]]))
    (out / "summary.json").write_text(json.dumps({**summary, "timings_s": results["timings"], "setup": setup}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fasttangent reproduce yinyang", description=DESCRIPTION)
    parser.add_argument("--out", default="runs/yinyang")
    parser.add_argument("--runs", type=int, default=None, help="independent runs (default 100; 12 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a small version: 12 runs, 300 steps, 80x80 grid")
    parser.add_argument("--steps", type=int, default=None, help="iterations of every run (panel b), default 500")
    parser.add_argument("--max-steps", type=int, default=None, help="cap for runs short of the last threshold")
    parser.add_argument("--grid", type=int, default=None, help="test grid side (default 200)")
    parser.add_argument("--probe-runs", type=int, default=None, help="runs with linearity metrics (default 20)")
    parser.add_argument("--reduction", choices=("sum", "mean"), default=None,
                        help="objective over the training set: sum (the paper's eq. 1, default) or mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes, one α each, one thread each (default: 2 when 2+ cores, else 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads when --workers=1")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    values = dict(QUICK) if args.quick else {}
    for key, value in (("runs", args.runs), ("curve_steps", args.steps), ("max_steps", args.max_steps),
                       ("grid", args.grid), ("probe_runs", args.probe_runs),
                       ("loss_reduction", args.reduction)):
        if value is not None:
            values[key] = value
    setup = YinYangSetup(seed=args.seed, **values)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)
    results = run_experiment(setup, log=_print, workers=workers)
    summary, delta_maps = summarize(results)
    plot_figure(results, delta_maps, out / "fig1.png")
    save(results, summary, delta_maps, out)
    print(json.dumps({"claims": summary["claims"], "reached": summary["reached"], "timings_s": results["timings"]},
                     indent=1))
    print(f"figure: {out / 'fig1.png'}")
    return 0
