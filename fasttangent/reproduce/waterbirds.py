"""Fig. 3 (bottom): Waterbirds, bird type with the spurious background, α ∈ {0.5, 1, 100}.

Paper scale: the 4 795 Waterbirds training images, an ImageNet-pretrained torchvision
ResNet18 (weights read from ``task_args.pretrained_weights``, default
DATA_DIR/resnet18-f37072fd.pth; never downloaded) with a fresh 1-output head and BatchNorm
frozen in eval mode, SGD lr 0.001 momentum 0.9 batch 100; balanced sets of 180 per
(bird, place) group where available. "With spurious correlation": bird type and background
agree. CPU scale: the planted-feature Fashion-MNIST task of the celeba stand-in, started from
a small CNN pretrained on the other Fashion-MNIST classes (made on first use).

    fasttangent reproduce waterbirds --scale paper --data-dir DIR   # DIR/waterbird_complete95_forest2water2
    fasttangent reproduce waterbirds --scale cpu
"""
from __future__ import annotations

from pathlib import Path

from . import _image_common as common

DESCRIPTION = "Fig. 3 bottom: spurious correlation, Waterbirds (or its CPU stand-in)"

task = common.spurious_task


def figures(rows: list, config, out: Path) -> dict:
    return common.spurious_figures(rows, config, out, "Waterbirds" if common.task_arg(config, "dataset") == "waterbirds"
                                   else "planted-feature stand-in (pretrained)")


def main(argv=None) -> int:
    return common.run("waterbirds", DESCRIPTION, argv, figures)
