"""Fig. 2 (bottom): 15% label noise, clean vs noisy examples, α = 1 vs α = 100.

A fraction ``noise`` (0.15) of the training labels is moved to a uniformly drawn *different*
class (``fasttangent.data.label_noise``). Each row logs loss and accuracy on the clean
examples, on the noisy ones (against their noisy label, i.e. memorization) and on held-out
examples; the figure plots them against the clean-example loss (equal progress).

Paper scale: CIFAR-10 (first 40 000 training images, next 10 000 held out), CIFAR ResNet18
without normalization, SGD lr 0.01 momentum 0.9 batch 125. CPU scale: Fashion-MNIST, the small CNN.

    fasttangent reproduce labelnoise --scale paper --data-dir DIR   # DIR/cifar-10-batches-py
    fasttangent reproduce labelnoise --scale cpu
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import _image_common as common

DESCRIPTION = "Fig. 2 bottom: clean vs noisy examples"


def task(config) -> "common.Task":
    """Training set with noisy labels; groups "clean", "noisy" (indices) and "heldout" (tensors)."""
    from .. import data as D

    data = common.classification_data(config)
    noisy_labels, flipped = D.label_noise(data["y"], common.task_arg(config, "noise", 0.15),
                                          common.task_arg(config, "num_classes", 10),
                                          seed=common.task_arg(config, "noise_seed", 0))
    is_noisy = torch.zeros(len(noisy_labels), dtype=torch.bool)
    is_noisy[flipped.cpu()] = True
    groups = {"clean": torch.nonzero(~is_noisy).flatten(), "noisy": torch.nonzero(is_noisy).flatten()}
    if len(data["y_heldout"]):
        groups["heldout"] = (data["x_heldout"], data["y_heldout"])
    return common.classifier_task(config, data, noisy_labels, groups)


def clean_loss(run: list) -> np.ndarray:
    return common.group_value(run, "clean")


def figures(rows: list, config, out: Path) -> dict:
    plt = common.pyplot()
    runs = common.by_alpha(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15.6, 4))
    for alpha, run in runs.items():
        x = clean_loss(run)
        style = common.linestyle(alpha)
        label = common.regime_label(alpha)
        axes[0].plot(x, common.group_value(run, "noisy"), style, color="tab:red", label=f"{label} noisy")
        axes[0].plot(x, common.group_value(run, "heldout"), style, color="tab:blue", label=f"{label} held-out")
        axes[1].plot(x, common.group_value(run, "noisy", "acc"), style, color="tab:red", label=f"{label} noisy")
        axes[1].plot(x, common.group_value(run, "clean", "acc"), style, color="tab:green", label=f"{label} clean")
        axes[1].plot(x, common.group_value(run, "heldout", "acc"), style, color="tab:blue", label=f"{label} held-out")
    axes[0].set(xlabel="clean examples loss", ylabel="loss", title="noisy-label and held-out loss")
    axes[1].set(xlabel="clean examples loss", ylabel="accuracy", title="accuracy (noisy: on the noisy label)")
    for ax in axes[:2]:
        ax.legend(fontsize=6)
    common.plot_metrics(axes[2], runs, clean_loss, "clean examples loss")
    paths = [common.save_figure(fig, out / "labelnoise.png")]

    grid = common.shared_grid([clean_loss(run) for run in runs.values()])
    summary = {"figures": paths, "final_metrics": common.metrics_summary(runs), "grid": (
        [float(grid[0]), float(grid[-1])] if len(grid) else None)}
    summary["noisy_loss_at_equal_clean_loss"] = {
        f"{a:g}": common.nanmean(common.on_grid(clean_loss(r), common.group_value(r, "noisy"), grid))
        for a, r in runs.items()}
    summary["best_heldout_loss"] = {f"{a:g}": float(np.nanmin(common.group_value(r, "heldout")))
                                    for a, r in runs.items() if "heldout" in r[0]["groups"]}
    summary["best_heldout_acc"] = {f"{a:g}": float(np.nanmax(common.group_value(r, "heldout", "acc")))
                                   for a, r in runs.items() if "heldout" in r[0]["groups"]}
    # start of the memorization phase: the clean loss at which the noisy loss peaks
    summary["clean_loss_when_noisy_loss_peaks"] = {
        f"{a:g}": float(clean_loss(r)[int(np.nanargmax(common.group_value(r, "noisy")))]) for a, r in runs.items()}
    summary["final"] = {f"{a:g}": {"step": r[-1]["step"], **{g: r[-1]["groups"][g] for g in r[-1]["groups"]}}
                        for a, r in runs.items()}
    return summary


def main(argv=None) -> int:
    return common.run("labelnoise", DESCRIPTION, argv, figures)
