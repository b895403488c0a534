"""Fig. 2 (top): training and held-out loss per C-score decile, α = 1 vs α = 100.

Paper scale: CIFAR-10, the first 40 000 training images trained on and the next 10 000 held
out (the authors' split, so held-out examples have published C-scores), CIFAR ResNet18
without normalization, SGD lr 0.01 momentum 0.9 batch 125, no augmentation, α = 1 for 200
epochs and α = 100 for 1 000 epochs; C-scores from ``cifar10-cscores-orig-order.npz``
(labels checked against CIFAR-10). CPU scale: Fashion-MNIST, C-scores estimated by hold-out
consistency (``fasttangent.data.holdout_cscores``), the small CNN.

    fasttangent reproduce cscores --scale paper --data-dir DIR
        # DIR holds cifar-10-batches-py/ and cifar10-cscores-orig-order.npz
    fasttangent reproduce cscores --scale cpu
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import _image_common as common

DESCRIPTION = "Fig. 2 top: loss per C-score decile"
NUM_BINS = 10


def scores(config, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """C-scores of the training and held-out examples: published (CIFAR-10) or estimated."""
    from .. import data as D

    dataset = common.task_arg(config, "dataset")
    if dataset == "cifar10":
        root = common.data_dir(config)
        path = common.task_arg(config, "cscores_path", "") or os.path.join(root, "cifar10-cscores-orig-order.npz")
        all_scores = D.load_cscores(path, cifar_root=root)
        return all_scores[data["index"]], all_scores[data["index_heldout"]]
    method = common.task_arg(config, "cscore_method", "holdout")
    options = dict(common.task_arg(config, "cscore_options", {}))
    x = torch.cat([data["x"], data["x_heldout"]])
    y = torch.cat([data["y"], data["y_heldout"]])
    estimators = {"holdout": D.holdout_cscores, "learning_speed": D.learning_speed_scores}
    if method not in estimators:
        raise ValueError(f"task_args.cscore_method = {method!r}; choose one of {sorted(estimators)}")
    signature = {"method": method, "options": options, "n": len(y), "rows": data["index"][:20].tolist(),
                 "dataset": dataset, "data_seed": common.task_arg(config, "data_seed", 0)}
    estimate = common.cached_tensor(Path(config.out) / "estimated_cscores.pt", signature,
                                    lambda: estimators[method](x, y, 10, **options).double())
    n = len(data["y"])
    return estimate[:n], estimate[n:]


def task(config) -> "common.Task":
    """Training set, decile groups (train indices and held-out tensors), network."""
    from .. import data as D

    data = common.classification_data(config)
    train_scores, heldout_scores = scores(config, data)
    groups = {f"train_d{k}": idx for k, idx in enumerate(D.cscore_deciles(train_scores, NUM_BINS))}
    if len(data["y_heldout"]):
        for k, idx in enumerate(D.cscore_deciles(heldout_scores, NUM_BINS)):
            groups[f"heldout_d{k}"] = (data["x_heldout"][idx], data["y_heldout"][idx])
    return common.classifier_task(config, data, data["y"], groups)


def mean_train_loss(run: list) -> np.ndarray:
    """Mean training loss in eval mode: the average of the (equal-sized) decile losses."""
    return np.nanmean([common.group_value(run, f"train_d{k}") for k in range(NUM_BINS)], axis=0)


def spread(run: list, prefix: str) -> np.ndarray:
    """Loss of the bottom decile minus loss of the top decile (hard − easy)."""
    return common.group_value(run, f"{prefix}_d0") - common.group_value(run, f"{prefix}_d{NUM_BINS - 1}")


def figures(rows: list, config, out: Path) -> dict:
    plt = common.pyplot()
    runs = common.by_alpha(rows)
    has_heldout = any("heldout_d0" in r["groups"] for r in rows)
    panels = ["train"] + (["heldout"] if has_heldout else [])
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.2 * (len(panels) + 1), 4))
    shown = {NUM_BINS - 1: "top 10% c-scores", 7: "70-80% decile", 2: "20-30% decile", 0: "bottom 10%"}
    colors = dict(zip(shown, ["yellowgreen", "tab:green", "teal", "midnightblue"]))
    for ax, prefix in zip(axes, panels):
        for alpha, run in runs.items():
            x = mean_train_loss(run)
            for k, name in shown.items():
                ax.plot(x, common.group_value(run, f"{prefix}_d{k}"), common.linestyle(alpha), color=colors[k],
                        label=name if alpha == min(runs) else None)
        for alpha in runs:
            ax.plot([], [], common.linestyle(alpha), color="gray", label=common.regime_label(alpha))
        kind = "training" if prefix == "train" else "held-out"
        ax.set(xlabel="mean training loss", ylabel=f"per c-score bin {kind} loss",
               title=f"{kind} loss per C-score decile")
        ax.legend(fontsize=7)
    common.plot_metrics(axes[-1], runs, mean_train_loss, "mean training loss")
    paths = [common.save_figure(fig, out / "cscores.png")]

    summary = {"figures": paths, "final_metrics": common.metrics_summary(runs),
               "hard_minus_easy_loss_at_equal_mean_loss": {}, "fraction_of_grid_where_alpha1_spread_larger": {}}
    grid = common.shared_grid([mean_train_loss(run) for run in runs.values()])
    for prefix in panels:
        on_grid = {a: common.on_grid(mean_train_loss(r), spread(r, prefix), grid) for a, r in runs.items()}
        summary["hard_minus_easy_loss_at_equal_mean_loss"][prefix] = {f"{a:g}": common.nanmean(v)
                                                                      for a, v in on_grid.items()}
        if 1.0 in on_grid and len(on_grid) > 1:
            lazy = on_grid[max(on_grid)]
            ok = np.isfinite(on_grid[1.0]) & np.isfinite(lazy)
            summary["fraction_of_grid_where_alpha1_spread_larger"][prefix] = (
                float(np.mean(on_grid[1.0][ok] > lazy[ok])) if ok.any() else None)
    summary["grid"] = [float(grid[0]), float(grid[-1])] if len(grid) else None
    summary["final"] = {f"{a:g}": {"step": r[-1]["step"], "mean_train_loss": float(mean_train_loss(r)[-1])}
                        for a, r in runs.items()}
    return summary


def main(argv=None) -> int:
    return common.run("cscores", DESCRIPTION, argv, figures)
