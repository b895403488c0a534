"""Example groups: C-score deciles, label noise, spurious groups, planted-feature tasks."""
import os

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import fasttangent.data as D

CSCORES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-cscores-orig-order.npz")


# ----------------------------------------------------------------------------------------- deciles
def _check_partition(scores, bins):
    n = len(scores)
    assert torch.equal(torch.sort(torch.cat(bins)).values, torch.arange(n))
    sizes = [len(b) for b in bins]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    for lower, upper in zip(bins[:-1], bins[1:]):
        assert scores[lower].max() <= scores[upper].min()


def test_deciles_partition_with_ties():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.5, 0.5, 0.3, 0.7, 0.2, 0.5, 0.0, 1.0, 0.5, 0.4])
    bins = D.cscore_deciles(scores, num_bins=4)
    _check_partition(scores, bins)
    # Hand-ranked: ascending 0.0(9) 0.1(1) 0.2(7) 0.3(5) | 0.4(12) 0.5(0) 0.5(3) | 0.5(4) 0.5(8) 0.5(11) | 0.7 0.9 1.0
    assert [b.tolist() for b in bins] == [[1, 5, 7, 9], [0, 3, 12], [4, 8, 11], [2, 6, 10]]
    assert D.cscore_bins(scores, 4).tolist() == [1, 0, 3, 1, 2, 0, 3, 0, 2, 0, 3, 2, 1]


@pytest.mark.skipif(not os.path.isfile(CSCORES), reason="shared C-score file absent")
def test_deciles_on_real_cscores():
    scores = D.load_cscores(CSCORES)
    bins = D.cscore_deciles(scores)
    _check_partition(scores, bins)
    assert [len(b) for b in bins] == [5000] * 10
    assert int(torch.argmin(scores)) in bins[0].tolist() and int(torch.argmax(scores)) in bins[9].tolist()


def test_deciles_reject_nan():
    with pytest.raises(ValueError, match="NaN"):
        D.cscore_deciles(torch.tensor([0.1, float("nan")]))


# ----------------------------------------------------------------------------------------- label noise
def test_label_noise_exact_fraction_and_changes():
    labels = torch.arange(1000) % 10
    noisy, flipped = D.label_noise(labels, 0.15, 10, seed=1)
    assert len(flipped) == 150 and len(set(flipped.tolist())) == 150
    assert (noisy[flipped] != labels[flipped]).all()
    keep = torch.ones(1000, dtype=torch.bool)
    keep[flipped] = False
    assert torch.equal(noisy[keep], labels[keep])
    assert noisy.dtype == torch.int64 and noisy.min() >= 0 and noisy.max() <= 9
    assert torch.equal(labels, torch.arange(1000) % 10)  # input untouched


def test_label_noise_seeded():
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    a = D.label_noise(labels, 0.2, seed=7)
    b = D.label_noise(labels, 0.2, seed=7)
    c = D.label_noise(labels, 0.2, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert len(D.label_noise(labels, 0.0)[1]) == 0


def test_label_noise_uniform_over_other_classes():
    num_classes = 5
    labels = torch.arange(20000) % num_classes
    noisy, flipped = D.label_noise(labels, 0.5, num_classes, seed=3)
    for cls in range(num_classes):
        was = flipped[labels[flipped] == cls]
        counts = torch.bincount(noisy[was], minlength=num_classes).numpy()
        assert counts[cls] == 0
        # Uniform over the 4 other classes: a loose chi-square check.
        assert chisquare(np.delete(counts, cls)).pvalue > 1e-4
    # Which examples are flipped does not depend on their class.
    assert chisquare(torch.bincount(labels[flipped], minlength=num_classes).numpy()).pvalue > 1e-4


def test_label_noise_errors():
    with pytest.raises(ValueError, match="fraction"):
        D.label_noise(torch.zeros(4, dtype=torch.long), 1.5, 2)
    with pytest.raises(ValueError, match="labels must lie in"):
        D.label_noise(torch.tensor([0, 3]), 0.5, 3)


# ----------------------------------------------------------------------------------------- spurious groups
def test_balanced_groups():
    y = torch.tensor([0] * 10 + [1] * 10)
    a = torch.tensor([0] * 6 + [1] * 4 + [0] * 2 + [1] * 8)
    with pytest.warns(UserWarning, match=r"fewer than 3 examples in \(y=1, attribute=0\): 2"):
        picked = D.balanced_group_indices(y, a, 3, seed=0)
    assert picked.counts == {(0, 0): 3, (0, 1): 3, (1, 0): 2, (1, 1): 3} and picked.short == {(1, 0): 2}
    assert torch.equal(D.group_index(y[picked.indices], a[picked.indices]), picked.group)
    assert len(set(picked.indices.tolist())) == 11
    with pytest.warns(UserWarning):
        again = D.balanced_group_indices(y, a, 3, seed=0)
    assert torch.equal(again.indices, picked.indices)
    spread = {tuple(D.balanced_group_indices(y, a, 2, seed=s).indices.tolist()) for s in range(8)}  # 2 ≤ every group
    assert len(spread) > 1


def test_group_index_and_alignment():
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    a = torch.tensor([0, 1, 0, 1, 1, 0])
    assert D.group_index(y, a).tolist() == [0, 1, 2, 3, 3, 0]
    # Majority attribute: class 0 → 0 (2 of 3), class 1 → 1 (2 of 3).
    assert D.spurious_aligned(y, a).tolist() == [True, False, False, True, True, True]
    # CelebA-like negative correlation: blond (y = 1) mostly not male (a = 0).
    ref_y, ref_a = torch.tensor([1, 1, 1, 0, 0, 0]), torch.tensor([0, 0, 1, 1, 1, 0])
    got = D.spurious_aligned(torch.tensor([1, 1, 0, 0]), torch.tensor([0, 1, 1, 0]), reference_y=ref_y,
                             reference_attribute=ref_a)
    assert got.tolist() == [True, False, True, False]
    # the same examples against a positively correlated reference (Waterbirds-like): a == y
    got = D.spurious_aligned(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 0, 1]), reference_y=ref_y,
                             reference_attribute=1 - ref_a)
    assert got.tolist() == [False, True, False, True]
    # CelebA's real shape: women are the majority of BOTH classes, yet non-blond men, not
    # non-blond women, carry the correlation (a per-class majority rule gets this wrong).
    ref_y = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0])
    ref_a = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1, 1])
    got = D.spurious_aligned(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 0, 1]), reference_y=ref_y,
                             reference_attribute=ref_a)
    assert got.tolist() == [True, False, True, False]


def test_holdout_split():
    train, held = D.holdout_split(50, 12, seed=2)
    assert len(held) == 12 and torch.equal(torch.sort(torch.cat([train, held])).values, torch.arange(50))
    assert torch.equal(D.holdout_split(50, 12, seed=2)[1], held)


# ----------------------------------------------------------------------------------------- planted feature
def test_plant_feature_pixels():
    x = torch.zeros(3, 1, 8, 8)
    x[0, 0, 4, 4] = 5.0
    out = D.plant_feature(x, torch.tensor([True, False, True]), feature="patch")
    assert torch.equal(out[1], x[1]) and out[0, 0, :2, :2].eq(5.0).all() and out[2, 0, :2, :2].eq(5.0).all()
    assert out[2].sum() == 4 * 5.0  # a 2×2 patch for 8×8 images
    assert x.sum() == 5.0  # the input is not modified
    border = D.plant_feature(x, torch.tensor([False, True, False]), feature="border", value=1.0)
    assert border[1].sum() == 28 and border[1, 0, 1:-1, 1:-1].sum() == 0


def test_planted_task_agreement_and_groups():
    gen = torch.Generator().manual_seed(0)
    train = D.Labeled(torch.rand(400, 1, 8, 8, generator=gen), torch.arange(400) % 4)
    test = D.Labeled(torch.rand(200, 1, 8, 8, generator=gen), torch.arange(200) % 4)
    tr, te = D.planted_spurious_task(train, test, positive_classes=(1,), negative_classes=(0, 2), seed=5)
    assert tr.index.tolist() == [i for i in range(400) if i % 4 != 3]
    assert tr.y.tolist() == [int(i % 4 == 1) for i in tr.index.tolist()]
    for cls in (0, 1):
        member = tr.y == cls
        assert (tr.attribute[member] == cls).sum() == round(0.95 * member.sum().item())
        member = te.y == cls
        assert (te.attribute[member] == cls).sum() == round(0.5 * member.sum().item())
    bright = train.x.max()
    has_patch = (tr.x[:, 0, :2, :2] == bright).all(-1).all(-1)
    assert torch.equal(has_patch, tr.attribute.bool())
    assert torch.equal(tr.x[~has_patch], train.x[tr.index[~has_patch]])
    again = D.planted_spurious_task(train, test, positive_classes=(1,), negative_classes=(0, 2), seed=5)
    assert torch.equal(again[0].attribute, tr.attribute)
    small, _ = D.planted_spurious_task(train, test, (1,), n_train=50, seed=0)
    assert len(small.y) == 50


def test_digits_spurious_task():
    tr, te = D.digits_spurious_task(n_train=300, seed=1)
    assert len(tr.y) == 300 and len(te.y) == 597
    assert set(tr.index.tolist()).isdisjoint(te.index.tolist())
    digits = D.load_digits()
    assert tr.y.tolist() == (digits.y[tr.index] % 2).tolist()
    assert D.spurious_aligned(te.y, te.attribute, reference_y=tr.y, reference_attribute=tr.attribute).float().mean() == \
        pytest.approx(0.5, abs=0.01)
