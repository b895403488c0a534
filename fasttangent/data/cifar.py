"""CIFAR-10 from the python pickles (``cifar-10-batches-py/``) and the CIFAR-10 C-scores.

Each batch file is a Python-2 pickle of a dict with keys ``data`` (uint8, (rows, 3072),
one image per row laid out R(1024) G(1024) B(1024), each plane row-major 32×32),
``labels`` (list of int), ``filenames`` and ``batch_label``; keys may be ``bytes``.
``batches.meta`` holds ``label_names`` and ``num_cases_per_batch``.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Optional

import numpy as np
import torch

from ._common import DataFormatError, Labeled, find_dir, normalize_channels, require_file, select_rows, to_device

# Per-channel mean and standard deviation of the 50 000 CIFAR-10 training images
# (pixel values scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
_HINT = (
    "extract cifar-10-python.tar.gz so that ROOT/cifar-10-batches-py/ holds data_batch_1..5, test_batch, batches.meta"
)


def _read_pickle(path: str) -> dict:
    require_file(path, _HINT)
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataFormatError(
            f"{path!r} is truncated or not a CIFAR-10 python pickle ({type(e).__name__}: {e}); re-extract the archive"
        ) from None
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path!r} holds a {type(obj).__name__}, expected a dict (CIFAR-10 python format)")
    # Python-2 pickles may come back with bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar10_meta(root: str) -> dict:
    """``batches.meta`` as a dict with str keys: ``label_names`` (list of 10 str), ``num_cases_per_batch``."""
    folder = find_dir(root, "cifar-10-batches-py", "batches.meta", _HINT)
    meta = _read_pickle(os.path.join(folder, "batches.meta"))
    for key in ("label_names", "num_cases_per_batch"):
        if key not in meta:
            raise DataFormatError(f"{os.path.join(folder, 'batches.meta')!r} has no key {key!r} (keys: {sorted(meta)})")
    meta["label_names"] = [n.decode("latin1") if isinstance(n, bytes) else n for n in meta["label_names"]]
    return meta


def read_cifar10_batch(path: str, expected_rows: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse one batch file into ``(data, labels)``: uint8 (rows, 3072) and int64 (rows,).

    Checks the keys, the row width, the label count and range, and (if given) the row count.
    """
    batch = _read_pickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise DataFormatError(f"{path!r} has no key {key!r} (keys: {sorted(batch)}); not a CIFAR-10 batch")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataFormatError(f"{path!r}: 'data' is {data.dtype} {data.shape}, expected uint8 (rows, 3072)")
    if labels.shape != (data.shape[0],):
        raise DataFormatError(f"{path!r}: {labels.size} labels for {data.shape[0]} images; the counts must match")
    if expected_rows is not None and data.shape[0] != expected_rows:
        raise DataFormatError(
            f"{path!r}: {data.shape[0]} images, but batches.meta says num_cases_per_batch = {expected_rows}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{path!r}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data, labels


def _read_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_dir(root, "cifar-10-batches-py", "batches.meta", _HINT)
    rows = int(read_cifar10_meta(folder)["num_cases_per_batch"])
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    parts = [read_cifar10_batch(os.path.join(folder, name), expected_rows=rows) for name in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_cifar10_labels(root: str, split: str = "train") -> torch.Tensor:
    """(n,) int64 labels of a split, in file order (data_batch_1..5 for ``"train"``)."""
    return torch.from_numpy(_read_split(root, split)[1])


def load_cifar10(
    root: str,
    split: str = "train",
    *,
    limit: Optional[int] = None,
    seed: Optional[int] = None,
    indices=None,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Labeled:
    """Load CIFAR-10 images and labels from ``root`` (``cifar-10-batches-py/`` or its parent).

    Returns ``Labeled(x, y)``: x (n, 3, 32, 32) ``dtype``, y (n,) int64, in file order
    (training: data_batch_1..5 concatenated, the order of the C-scores).

    Normalization: pixels / 255, then per channel (x − mean_c) / std_c with the training
    set statistics ``CIFAR10_MEAN``, ``CIFAR10_STD`` (``normalize=False`` keeps [0, 1]).

    Subsets: ``indices`` (positions in file order) or ``limit`` examples (the first ones, or a
    seeded uniform sample when ``seed`` is given, kept in file order).
    """
    data, labels = _read_split(root, split)
    if indices is not None:
        keep = np.asarray(indices, dtype=np.int64)
        if keep.size and (keep.min() < 0 or keep.max() >= len(labels)):
            raise IndexError(
                f"CIFAR-10 {split}: indices must lie in [0, {len(labels)}), got {keep.min()}..{keep.max()}"
            )
    else:
        keep = select_rows(len(labels), limit, seed, f"CIFAR-10 {split}")
    x = torch.from_numpy(data[keep]).view(-1, 3, 32, 32).to(dtype).div_(255.0)
    if normalize:
        x = normalize_channels(x, CIFAR10_MEAN, CIFAR10_STD)
    return Labeled(to_device(x, device), to_device(torch.from_numpy(labels[keep]), device))


def load_cscores(path: str, cifar_labels=None, *, cifar_root: Optional[str] = None, device=None) -> torch.Tensor:
    """C-scores of the CIFAR-10 training set from ``cifar10-cscores-orig-order.npz``.

    The file holds ``labels`` (50000,) int64 and ``scores`` (50000,) float64 in the
    original training order (data_batch_1..5). Returns the (n,) float64 scores.

    When ``cifar_labels`` ((n,) labels in training order) or ``cifar_root`` is given, the
    file's ``labels`` must equal them; a mismatch raises DataFormatError naming the file
    and the number of disagreeing positions (the scores would be attached to the wrong images).
    """
    require_file(path, "download cifar10-cscores-orig-order.npz from github.com/pluskid/structural-regularity")
    try:
        with np.load(path) as npz:
            missing = {"labels", "scores"} - set(npz.files)
            if missing:
                raise DataFormatError(f"{path!r} lacks the array(s) {sorted(missing)} (has {npz.files})")
            file_labels = np.asarray(npz["labels"]).astype(np.int64)
            scores = np.asarray(npz["scores"], dtype=np.float64)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, DataFormatError):
            raise
        raise DataFormatError(f"{path!r} is truncated or not an .npz archive ({e})") from None
    if file_labels.ndim != 1 or scores.shape != file_labels.shape:
        raise DataFormatError(
            f"{path!r}: 'labels' {file_labels.shape} and 'scores' {scores.shape} must be 1-d of the same length"
        )
    if cifar_labels is None and cifar_root is not None:
        cifar_labels = read_cifar10_labels(cifar_root, "train")
    if cifar_labels is not None:
        check_cscore_labels(file_labels, cifar_labels, source=path)
    return to_device(torch.from_numpy(scores), device)


def check_cscore_labels(cscore_labels, cifar_labels, *, source: str = "C-score file") -> None:
    """Raise DataFormatError unless the C-score file's labels equal the CIFAR-10 training labels."""
    a = np.asarray(torch.as_tensor(cscore_labels).cpu()).astype(np.int64)
    b = np.asarray(torch.as_tensor(cifar_labels).cpu()).astype(np.int64)
    if a.shape != b.shape:
        raise DataFormatError(
            f"{source!r}: {a.size} C-score labels but {b.size} CIFAR-10 training labels; "
            "use the full training set (data_batch_1..5) in its original order"
        )
    bad = np.flatnonzero(a != b)
    if bad.size:
        raise DataFormatError(
            f"{source!r}: labels disagree with the CIFAR-10 training labels at {bad.size} of {a.size} positions "
            f"(first at index {bad[0]}: file {a[bad[0]]}, CIFAR {b[bad[0]]}); the scores must be in the original "
            "data_batch_1..5 order (use the *-orig-order.npz file)"
        )
