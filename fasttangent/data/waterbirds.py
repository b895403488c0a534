"""Waterbirds (Sagawa et al.): ``waterbird_complete95_forest2water2/metadata.csv`` + images.

metadata.csv header: ``img_id,img_filename,y,split,place,place_filename``;
y 1 = waterbird, split 0/1/2 = train/val/test, place 1 = water background;
``img_filename`` is relative to the folder (``<species folder>/<name>.jpg``).
"""
from __future__ import annotations

import csv
import os
from typing import Optional

import numpy as np

from ._common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AttributeLabeled,
    DataFormatError,
    find_dir,
    load_images,
    long_tensor,
    normalize_channels,
    select_rows,
    to_device,
)
from .groups import balanced_group_indices

FOLDER = "waterbird_complete95_forest2water2"
COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
SPLITS = {"train": 0, "val": 1, "valid": 1, "test": 2}
_ALLOWED = {"y": {0, 1}, "split": {0, 1, 2}, "place": {0, 1}}


def read_waterbirds_metadata(root: str) -> dict:
    """Parse metadata.csv of ``root`` (the Waterbirds folder or its parent).

    Returns a dict: ``folder`` (str), ``img_filename`` (list of str), and (n,) int64 arrays
    ``img_id``, ``y``, ``split``, ``place``, in file order.
    """
    folder = find_dir(root, FOLDER, "metadata.csv", f"extract {FOLDER}.tar.gz under ROOT")
    path = os.path.join(folder, "metadata.csv")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataFormatError(f"{path!r} is empty; expected the header {','.join(COLUMNS)}") from None
        rows = [r for r in reader if r]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataFormatError(
            f"{path!r}: missing column(s) {missing}; expected the header {','.join(COLUMNS)}, got {','.join(header)}"
        )
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise DataFormatError(f"{path!r}: data row {bad + 1} has {len(rows[bad])} fields, header has {len(header)}")
    out = {"folder": folder, "img_filename": [r[header.index("img_filename")] for r in rows]}
    for col in ("img_id", "y", "split", "place"):
        try:
            values = np.array([int(float(r[header.index(col)])) for r in rows], dtype=np.int64)
        except ValueError as e:
            raise DataFormatError(f"{path!r}: column {col!r} must hold integers ({e})") from None
        if col in _ALLOWED and set(np.unique(values).tolist()) - _ALLOWED[col]:
            raise DataFormatError(
                f"{path!r}: column {col!r} must take values in {sorted(_ALLOWED[col])}, "
                f"found {np.unique(values).tolist()}"
            )
        out[col] = values
    return out


def load_waterbirds(
    root: str,
    split: str = "train",
    *,
    n_images: Optional[int] = None,
    seed: Optional[int] = None,
    per_group: Optional[int] = None,
    group_seed: int = 0,
    image_size: int = 224,
    crop: str = "resize_then_center",
    normalize: bool = True,
    device=None,
    workers: int = 8,
) -> AttributeLabeled:
    """Load one Waterbirds split as ``AttributeLabeled(x, y, attribute, index)``.

    y = waterbird (1) / landbird (0); attribute = place, water (1) / land (0);
    index = row of metadata.csv. x: (n, 3, image_size, image_size) float32.
    The training split has 4 795 images (the paper uses all of them).

    Selection before decoding: ``n_images`` (first ones, or a uniform sample with ``seed``),
    then ``per_group`` per (y, place) group (180 in the paper; short groups taken whole
    with a warning), drawn with ``group_seed``.
    Images: Sagawa et al.'s evaluation transform by default (``crop="resize_then_center"``:
    resize to a square of side image_size·256/224, crop the central image_size square);
    ``normalize`` applies the ImageNet statistics expected by a pretrained ResNet18.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    meta = read_waterbirds_metadata(root)
    rows = np.flatnonzero(meta["split"] == SPLITS[split])
    rows = rows[select_rows(len(rows), n_images, seed, f"Waterbirds {split}")]
    if per_group is not None:
        chosen = balanced_group_indices(meta["y"][rows], meta["place"][rows], per_group, seed=group_seed)
        rows = rows[chosen.indices.numpy()]
    paths = [os.path.join(meta["folder"], meta["img_filename"][r]) for r in rows]
    x = load_images(paths, image_size, crop, workers)
    if normalize:
        x = normalize_channels(x, IMAGENET_MEAN, IMAGENET_STD)
    return AttributeLabeled(
        to_device(x, device),
        long_tensor(meta["y"][rows], device),
        long_tensor(meta["place"][rows], device),
        long_tensor(rows, device),
    )
