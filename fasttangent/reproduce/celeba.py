"""Fig. 3 (top): CelebA, Blond_Hair with the spurious attribute Male, α ∈ {0.5, 1, 100}.

Paper scale: 20 000 CelebA training images (``task_args.n_train``; the authors' code used
15 000), torchvision ResNet18 without normalization and 1 output (logistic loss), SGD lr 0.01
momentum 0.9 batch 100; balanced sets of 180 per (blond, male) group from the training pool
(short groups taken whole) and from the test split. "With spurious correlation": blond women
and non-blond men. CPU scale: a Fashion-MNIST binary task with a planted patch that agrees
with the label on 95% of training and 50% of test examples, the small CNN from scratch.

    fasttangent reproduce celeba --scale paper --data-dir DIR   # DIR/img_align_celeba, DIR/list_attr_celeba.txt, ...
    fasttangent reproduce celeba --scale cpu
"""
from __future__ import annotations

from pathlib import Path

from . import _image_common as common

DESCRIPTION = "Fig. 3 top: spurious correlation, CelebA (or its CPU stand-in)"

task = common.spurious_task


def figures(rows: list, config, out: Path) -> dict:
    return common.spurious_figures(rows, config, out, "CelebA" if common.task_arg(config, "dataset") == "celeba"
                                   else "planted-feature stand-in (from scratch)")


def main(argv=None) -> int:
    return common.run("celeba", DESCRIPTION, argv, figures)
