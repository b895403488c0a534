"""Datasets, example groups and C-score estimation for the "Lazy vs hasty" reproductions.

Every loader parses the on-disk format itself (no downloads, no MD5 checks). A missing file
raises FileNotFoundError naming it; a malformed one raises :class:`DataFormatError` (a
ValueError) naming the file and the problem. ``device=`` places the returned tensors on
that device (kept on the CPU, with a warning, if they do not fit).

Result tuples (NamedTuples, so ``x, y = load_cifar10(...)`` works)
    Labeled(x, y)                          x (n, ...) float, y (n,) int64
    AttributeLabeled(x, y, attribute, index)
        y (n,) int64 binary target, attribute (n,) int64 binary spurious attribute,
        index (n,) int64 row of each example in its source file / array

Real data (user-supplied)
    load_cifar10(root, split="train"|"test", *, limit=None, seed=None, indices=None,
                 normalize=True, dtype=float32, device=None) -> Labeled
        root = cifar-10-batches-py/ or its parent. x (n, 3, 32, 32): pixels/255, then
        (x − CIFAR10_MEAN_c) / CIFAR10_STD_c (training-set channel statistics). Training
        order = data_batch_1..5 (the C-score order). limit: the first n, or a seeded sample.
    read_cifar10_labels(root, split) -> (n,) int64;  read_cifar10_batch(path) -> (uint8 (r, 3072), int64 (r,))
    load_cscores(path, cifar_labels=None, *, cifar_root=None, device=None) -> (50000,) float64
        cifar10-cscores-orig-order.npz; with cifar_labels / cifar_root its ``labels`` must
        equal the CIFAR-10 training labels (else DataFormatError with the mismatch count).
    check_cscore_labels(cscore_labels, cifar_labels)
    load_celeba(root, split="train"|"valid"|"test", *, target="Blond_Hair", spurious="Male",
                n_images=None, seed=None, per_group=None, group_seed=0, image_size=64,
                crop="center_square", normalize=True, device=None) -> AttributeLabeled
        Text (list_attr_celeba.txt, list_eval_partition.txt) or CSV layout. n_images: the
        training-pool size (paper 20 000, authors' code 15 000): first ones, or a seeded
        sample. per_group: balanced set of that many per (y, attribute) group (paper: 180).
        Images: central 178×178 square resized to image_size; ImageNet normalization.
    read_celeba_metadata(root) -> CelebAMetadata(image_ids, attribute_names, attributes (n, 40)
        {0,1}, partition (n,), image_dir)        (no image is decoded)
    load_waterbirds(root, split="train"|"val"|"test", *, n_images=None, seed=None, per_group=None,
                    group_seed=0, image_size=224, crop="resize_then_center", normalize=True,
                    device=None) -> AttributeLabeled
        y = waterbird, attribute = place (1 = water). 4 795 training images. Sagawa et al.'s
        resize(256/224)+center-crop, ImageNet normalization (for a pretrained ResNet18).
    read_waterbirds_metadata(root) -> dict of metadata.csv columns

Real data available offline
    load_fashion_mnist(root=FASHION_MNIST_DIR, split="train"|"test", *, limit=None, seed=None,
                       normalize=True, flatten=False, device=None) -> Labeled
        x (n, 1, 28, 28) (or (n, 784)): pixels/255, then (x − 0.2860) / 0.3530.
        Default root /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist).
    read_idx(path, ndim=None) -> uint8 array (checks magic number, dims and size)
    load_digits(*, normalize=True, flatten=False, device=None) -> Labeled  (1797, 1, 8, 8)

Example groups
    cscore_deciles(scores, num_bins=10) -> list of index tensors; entry 0 = lowest scores
        (hardest), entry 9 = highest (the paper's "top 10% c-scores"). cscore_bins(scores) -> (n,) bin ids.
    label_noise(labels, fraction, num_classes=None, *, seed=0) -> (noisy_labels, flipped_indices)
        exactly round(fraction·n) labels moved to a uniformly drawn different class.
    group_index(y, attribute) -> 2·y + attribute  (0..3)
    spurious_aligned(y, attribute, *, reference_y=None, reference_attribute=None) -> (n,) bool
        "with spurious": attribute equals its class's majority attribute in the reference
        (training) set. Waterbirds: y == place; CelebA: blond women and non-blond men.
    balanced_group_indices(y, attribute, per_group, *, seed=0) -> BalancedGroups(indices, group,
        counts, short); short groups are taken whole, recorded in ``short`` and warned about.
    holdout_split(n, num_holdout, *, seed=0) -> (train_indices, holdout_indices)

C-score estimation (for Fashion-MNIST and digits, which have no published scores)
    holdout_cscores(x, y, num_classes=None, *, subset_ratios=(.25, .5, .75), models_per_ratio=32,
                    model="softmax"|"mlp", steps=300, lr=0.01, soft=False, seed=0, device=None) -> (n,)
        Jiang et al.'s hold-out consistency with many small models trained at once.
    learning_speed_scores(x, y, num_classes=None, *, model="softmax", epochs=10, replicas=4,
                          measure="confidence"|"correct", seed=0, device=None) -> (n,)
        cheap proxy: mean confidence in the label over the epochs of training.
    score_agreement(a, b) -> Spearman rank correlation (NaNs ignored)

Planted-spurious-feature tasks (CPU stand-ins for CelebA / Waterbirds)
    planted_spurious_task(train, test, positive_classes, negative_classes=None, *,
                          train_agreement=0.95, test_agreement=0.5, n_train=None, n_test=None,
                          feature="patch"|"border", size=None, seed=0, device=None)
        -> (train, test) AttributeLabeled; y = class in positive_classes, attribute = feature
        stamped (bright corner patch / border), a = y for exactly the given fraction per class.
    fashion_mnist_spurious_task(root=..., positive_classes=(0, 2, 4, 6), **kw)
    digits_spurious_task(positive_classes=(1, 3, 5, 7, 9), *, num_test=597, split_seed=0, **kw)
    plant_feature(x, present, *, feature="patch", size=None, value=None) -> stamped copy of x
"""
from ._common import IMAGENET_MEAN, IMAGENET_STD, AttributeLabeled, DataFormatError, Labeled
from .celeba import CelebAMetadata, load_celeba, read_celeba_metadata
from .cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    check_cscore_labels,
    load_cifar10,
    load_cscores,
    read_cifar10_batch,
    read_cifar10_labels,
    read_cifar10_meta,
)
from .cscore_estimation import holdout_cscores, learning_speed_scores, score_agreement
from .groups import (
    BalancedGroups,
    balanced_group_indices,
    cscore_bins,
    cscore_deciles,
    group_index,
    holdout_split,
    label_noise,
    spurious_aligned,
)
from .small import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_digits,
    load_fashion_mnist,
    read_fashion_mnist,
    read_idx,
)
from .spurious_task import digits_spurious_task, fashion_mnist_spurious_task, plant_feature, planted_spurious_task
from .waterbirds import load_waterbirds, read_waterbirds_metadata

__all__ = [
    "AttributeLabeled", "BalancedGroups", "CIFAR10_MEAN", "CIFAR10_STD", "CelebAMetadata", "DataFormatError",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "IMAGENET_MEAN",
    "IMAGENET_STD", "Labeled", "balanced_group_indices", "check_cscore_labels", "cscore_bins", "cscore_deciles",
    "digits_spurious_task", "fashion_mnist_spurious_task", "group_index", "holdout_cscores", "holdout_split",
    "label_noise", "learning_speed_scores", "load_celeba", "load_cifar10", "load_cscores", "load_digits",
    "load_fashion_mnist", "load_waterbirds", "plant_feature", "planted_spurious_task", "read_celeba_metadata",
    "read_cifar10_batch", "read_cifar10_labels", "read_cifar10_meta", "read_fashion_mnist", "read_idx",
    "read_waterbirds_metadata", "score_agreement", "spurious_aligned",
]
