"""Binary tasks with a planted spurious feature: CPU stand-ins for CelebA and Waterbirds.

Classes of a small image dataset are merged into a binary target y; a bright patch (or
border) — the spurious attribute a — is stamped on some images so that a = y for a chosen
fraction of examples (95% in training, 50% at test by default). Groups are (y, a), as for
CelebA (Blond_Hair, Male) and Waterbirds (y, place); "with spurious" examples have a = y.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._common import AttributeLabeled, Labeled
from .small import FASHION_MNIST_DIR, load_digits, load_fashion_mnist
from .groups import holdout_split


def plant_feature(
    x: torch.Tensor, present, *, feature: str = "patch", size: Optional[int] = None, value=None
) -> torch.Tensor:
    """Return a copy of images x (n, c, h, w) with the feature stamped where ``present`` (n,) is true.

    ``"patch"``: a size×size square in the top-left corner (default size max(2, h // 7));
    ``"border"``: a frame ``size`` pixels wide (default 1). Pixels are set to ``value``
    (default: the largest value in x, i.e. the brightest pixel of the data).
    """
    if x.ndim != 4:
        raise ValueError(f"plant_feature needs images (n, c, h, w), got shape {tuple(x.shape)}")
    present = torch.as_tensor(present, device=x.device).bool()
    value = x.max() if value is None else torch.as_tensor(value, dtype=x.dtype, device=x.device)
    h, w = x.shape[-2:]
    stamp = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    if feature == "patch":
        s = max(2, h // 7) if size is None else size
        stamp[:s, :s] = True
    elif feature == "border":
        s = 1 if size is None else size
        stamp[:s, :] = stamp[-s:, :] = stamp[:, :s] = stamp[:, -s:] = True
    else:
        raise ValueError(f"feature must be 'patch' or 'border', got {feature!r}")
    where = present.view(-1, 1, 1, 1) & stamp
    return torch.where(where, value.to(x.dtype), x)


def _assign_attribute(y: torch.Tensor, agreement: float, gen: torch.Generator) -> torch.Tensor:
    """Attribute a with a = y on exactly round(agreement · n_k) examples of each class k."""
    a = 1 - y
    for cls in (0, 1):
        members = torch.nonzero(y == cls).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        agree = members[: int(round(agreement * len(members)))]
        a[agree] = cls
    return a


def _build(data: Labeled, positive, negative, agreement, limit, gen, feature, size, value) -> AttributeLabeled:
    x, labels = data.x.cpu(), data.y.cpu()
    pos = torch.isin(labels, torch.as_tensor(list(positive)))
    neg = ~pos if negative is None else torch.isin(labels, torch.as_tensor(list(negative)))
    if (pos & neg).any():
        raise ValueError("positive_classes and negative_classes overlap")
    index = torch.nonzero(pos | neg).flatten()
    if limit is not None and limit < len(index):
        index = torch.sort(index[torch.randperm(len(index), generator=gen)[:limit]]).values
    y = pos[index].long()
    a = _assign_attribute(y, agreement, gen)
    return AttributeLabeled(plant_feature(x[index], a, feature=feature, size=size, value=value), y, a, index)


def planted_spurious_task(
    train: Labeled,
    test: Labeled,
    positive_classes: Sequence[int],
    negative_classes: Optional[Sequence[int]] = None,
    *,
    train_agreement: float = 0.95,
    test_agreement: float = 0.5,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    feature: str = "patch",
    size: Optional[int] = None,
    seed: int = 0,
    device=None,
) -> tuple[AttributeLabeled, AttributeLabeled]:
    """Build (train, test) ``AttributeLabeled`` sets of a binary task with a planted feature.

    train/test: ``Labeled`` images (n, c, h, w) and class labels. y = 1 for
    ``positive_classes``, 0 for ``negative_classes`` (default: every other class); other
    classes are dropped, then ``n_train``/``n_test`` examples are drawn uniformly (seeded).
    Within each class exactly round(agreement · n_k) examples get attribute a = y, the
    rest a = 1 − y; images with a = 1 carry the feature (see :func:`plant_feature`, stamped
    with the brightest training pixel). ``index`` points into the given arrays.
    """
    gen = torch.Generator().manual_seed(seed)
    value = train.x.max().cpu()
    parts = [
        _build(train, positive_classes, negative_classes, train_agreement, n_train, gen, feature, size, value),
        _build(test, positive_classes, negative_classes, test_agreement, n_test, gen, feature, size, value),
    ]
    if device is not None:
        parts = [AttributeLabeled(*(t.to(device) for t in p)) for p in parts]
    return parts[0], parts[1]


def fashion_mnist_spurious_task(
    root: str = FASHION_MNIST_DIR,
    positive_classes: Sequence[int] = (0, 2, 4, 6),
    negative_classes: Optional[Sequence[int]] = None,
    **kwargs,
) -> tuple[AttributeLabeled, AttributeLabeled]:
    """Planted-feature task on Fashion-MNIST (official train/test split). Default target:
    upper-body garments (T-shirt/top, Pullover, Coat, Shirt) vs the rest. ``kwargs`` go
    to :func:`planted_spurious_task`."""
    return planted_spurious_task(
        load_fashion_mnist(root, "train"),
        load_fashion_mnist(root, "test"),
        positive_classes,
        negative_classes,
        **kwargs,
    )


def digits_spurious_task(
    positive_classes: Sequence[int] = (1, 3, 5, 7, 9),
    negative_classes: Optional[Sequence[int]] = None,
    *,
    num_test: int = 597,
    split_seed: int = 0,
    **kwargs,
) -> tuple[AttributeLabeled, AttributeLabeled]:
    """Planted-feature task on scikit-learn digits (default: odd vs even), with a seeded
    split of ``num_test`` test images; ``index`` refers to the 1 797 digits. ``kwargs`` go to
    :func:`planted_spurious_task`."""
    digits = load_digits()
    train_idx, test_idx = holdout_split(len(digits.y), num_test, seed=split_seed)
    train, test = planted_spurious_task(
        Labeled(digits.x[train_idx], digits.y[train_idx]),
        Labeled(digits.x[test_idx], digits.y[test_idx]),
        positive_classes,
        negative_classes,
        **kwargs,
    )
    # Map indices back to positions among all 1 797 digits.
    return (train._replace(index=train_idx[train.index.cpu()].to(train.index.device)),
            test._replace(index=test_idx[test.index.cpu()].to(test.index.device)))
