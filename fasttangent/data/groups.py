"""Example groups: C-score deciles, seeded label noise, spurious-correlation groups."""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch


def _as_long(t) -> torch.Tensor:
    return torch.as_tensor(t).long()


def cscore_bins(scores, num_bins: int = 10) -> torch.Tensor:
    """Bin of each example when examples are ranked by increasing score.

    scores: (n,). Returns (n,) int64 in [0, num_bins): bin 0 holds the ⌈n/num_bins⌉ lowest
    scores (hardest examples), bin num_bins − 1 the highest (easiest). Bins differ in size
    by at most one; ties are broken by example index (stable sort), so the result is
    deterministic.
    """
    scores = torch.as_tensor(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-d (n,), got shape {tuple(scores.shape)}")
    if torch.isnan(scores.double()).any():
        raise ValueError("scores contain NaN; drop or impute them before ranking")
    order = torch.sort(scores.cpu(), stable=True).indices
    bins = torch.empty(len(scores), dtype=torch.long)
    for b, chunk in enumerate(torch.tensor_split(order, num_bins)):
        bins[chunk] = b
    return bins.to(scores.device)


def cscore_deciles(scores, num_bins: int = 10) -> list[torch.Tensor]:
    """Indices of the examples in each C-score bin (deciles by default).

    scores: (n,). Returns ``num_bins`` sorted int64 index tensors that partition range(n);
    entry 0 = lowest scores = hardest examples, entry ``num_bins − 1`` = highest = easiest
    (the paper's "top 10% c-scores"). See :func:`cscore_bins` for sizes and ties.
    """
    bins = cscore_bins(scores, num_bins)
    return [torch.nonzero(bins == b).flatten() for b in range(num_bins)]


def label_noise(labels, fraction: float, num_classes: Optional[int] = None, *, seed: int = 0):
    """Replace a fraction of the labels by a uniformly drawn *different* class.

    labels: (n,) int. Exactly ``round(fraction · n)`` examples, drawn uniformly without
    replacement, get a new label drawn uniformly from the ``num_classes − 1`` other classes
    (y_new = (y + u) mod C with u uniform in {1, …, C − 1}). Deterministic given ``seed``.

    Returns ``(noisy_labels, flipped)``: (n,) int64 on the labels' device, and the sorted
    (m,) int64 indices of the changed examples.
    """
    labels = _as_long(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-d (n,), got shape {tuple(labels.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    n = labels.numel()
    m = int(round(fraction * n))
    gen = torch.Generator().manual_seed(seed)
    flipped = torch.sort(torch.randperm(n, generator=gen)[:m]).values
    shift = torch.randint(1, num_classes, (m,), generator=gen)
    noisy = labels.cpu().clone()
    noisy[flipped] = (noisy[flipped] + shift) % num_classes
    return noisy.to(labels.device), flipped.to(labels.device)


def group_index(y, attribute) -> torch.Tensor:
    """Group of each example for a binary target and a binary attribute: 2·y + attribute.

    (y=0, a=0) → 0, (0, 1) → 1, (1, 0) → 2, (1, 1) → 3.
    """
    y, attribute = _as_long(y), _as_long(attribute)
    if y.numel() and (y.min() < 0 or y.max() > 1 or attribute.min() < 0 or attribute.max() > 1):
        raise ValueError("group_index expects binary y and attribute with values in {0, 1}")
    return 2 * y + attribute


def spurious_aligned(y, attribute, *, reference_y=None, reference_attribute=None) -> torch.Tensor:
    """Whether each example carries the spurious correlation ("with spurious").

    An example is aligned when its attribute predicts its label the way the attribute does
    on the reference set (default: the given examples; pass the training set): with a
    positive label–attribute covariance there, aligned means attribute == y (Waterbirds:
    y == place; planted features); with a negative one, attribute != y (CelebA, Blond_Hair
    vs Male: blond women and non-blond men). A per-class majority rule would be wrong for
    CelebA, where most people of *both* classes are women. Returns (n,) bool.
    """
    y, attribute = _as_long(y), _as_long(attribute)
    ry = y if reference_y is None else _as_long(reference_y).to(y.device)
    ra = attribute if reference_attribute is None else _as_long(reference_attribute).to(y.device)
    if ry.numel() == 0 or bool((ry == ry[0]).all()):
        raise ValueError("the reference set holds a single class; the label-attribute correlation is undefined")
    ry, ra = ry.double(), ra.double()
    covariance = ((ry - ry.mean()) * (ra - ra.mean())).mean()
    same = attribute == y
    return same if covariance >= 0 else ~same


class BalancedGroups(NamedTuple):
    """A balanced evaluation set over (target, attribute) groups.

    indices: (m,) int64 positions in the source, grouped by group 0..3 and sorted within
    each; group: (m,) int64 group id (see :func:`group_index`); counts: {(y, a): taken};
    short: {(y, a): available} for groups that had fewer than ``per_group`` examples.
    """

    indices: torch.Tensor
    group: torch.Tensor
    counts: dict
    short: dict


def balanced_group_indices(y, attribute, per_group: int, *, seed: int = 0) -> BalancedGroups:
    """Draw ``per_group`` examples uniformly without replacement from each (y, attribute) group.

    y, attribute: (n,) binary. A group with fewer than ``per_group`` examples contributes
    all of them; this is recorded in ``short`` and reported with a warning. Deterministic
    given ``seed``.
    """
    groups = group_index(y, attribute).cpu().numpy()
    rng = np.random.default_rng(seed)
    picked, group_ids, counts, short = [], [], {}, {}
    for g in range(4):
        members = np.flatnonzero(groups == g)
        key = (g // 2, g % 2)
        if len(members) < per_group:
            short[key] = len(members)
            take = members
        else:
            take = np.sort(rng.choice(members, size=per_group, replace=False))
        counts[key] = len(take)
        picked.append(take)
        group_ids.append(np.full(len(take), g))
    if short:
        desc = ", ".join(f"(y={k[0]}, attribute={k[1]}): {v}" for k, v in short.items())
        warnings.warn(f"balanced groups: fewer than {per_group} examples in {desc}; taking all of them", stacklevel=2)
    return BalancedGroups(
        torch.from_numpy(np.concatenate(picked).astype(np.int64)),
        torch.from_numpy(np.concatenate(group_ids).astype(np.int64)),
        counts,
        short,
    )


def holdout_split(n: int, num_holdout: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split range(n) uniformly at random into (train, holdout) sorted int64 index tensors,
    with ``num_holdout`` held out. Deterministic given ``seed``."""
    if not 0 <= num_holdout <= n:
        raise ValueError(f"num_holdout must be in [0, {n}], got {num_holdout}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.sort(perm[num_holdout:]).values, torch.sort(perm[:num_holdout]).values
