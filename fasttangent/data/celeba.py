"""CelebA attributes, partitions and aligned images (text or CSV layout).

Text layout (the original release):
  ``list_attr_celeba.txt``: line 1 the image count, line 2 the 40 attribute names, then
  one line per image ``000001.jpg -1  1 …`` (whitespace separated, values ±1);
  ``list_eval_partition.txt``: ``000001.jpg 0`` (0 train, 1 valid, 2 test).
CSV layout (Kaggle): ``list_attr_celeba.csv`` with header ``image_id,<40 names>`` and
``list_eval_partition.csv`` with header ``image_id,partition``.
Images: ``img_align_celeba/000001.jpg`` (178×218), or ``img_align_celeba/img_align_celeba/``.
"""
from __future__ import annotations

import csv
import io
import os
from typing import NamedTuple, Optional

import numpy as np

from ._common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AttributeLabeled,
    DataFormatError,
    load_images,
    long_tensor,
    normalize_channels,
    select_rows,
    to_device,
)
from .groups import balanced_group_indices

SPLITS = {"train": 0, "valid": 1, "val": 1, "test": 2}
_HINT = "ROOT must hold list_attr_celeba.txt + list_eval_partition.txt (or the .csv pair) and img_align_celeba/"


class CelebAMetadata(NamedTuple):
    """CelebA annotations. image_ids: n file names; attribute_names: 40 names in file order;
    attributes: (n, 40) int8 in {0, 1} (file's −1 → 0); partition: (n,) int64 (0 train, 1 valid,
    2 test); image_dir: folder of the jpgs."""

    image_ids: list
    attribute_names: list
    attributes: np.ndarray
    partition: np.ndarray
    image_dir: str


def _signs_to_bits(values: np.ndarray, path: str) -> np.ndarray:
    bad = (values != 1) & (values != -1)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DataFormatError(
            f"{path!r}: attribute values must be -1 or 1; data row {row + 1} has {values[row][bad[row]][0]}"
        )
    return (values > 0).astype(np.int8)


def _parse_attr_txt(path: str):
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    if len(lines) < 2:
        raise DataFormatError(
            f"{path!r}: expected a count line and an attribute-name line, file has {len(lines)} lines"
        )
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataFormatError(f"{path!r}: line 1 must be the image count, got {lines[0][:40]!r}") from None
    names = lines[1].split()
    body = [line for line in lines[2:] if line.strip()]
    if len(body) != count:
        raise DataFormatError(
            f"{path!r}: line 1 says {count} images but the file lists {len(body)}; it is truncated or damaged"
        )
    # One whole-file token count is much cheaper than splitting 200 000 lines; only on a
    # mismatch is the offending line searched for.
    if len(text.split()) != 1 + len(names) + count * (len(names) + 1):
        i = next(i for i, line in enumerate(body) if len(line.split()) != len(names) + 1)
        raise DataFormatError(
            f"{path!r}: image line {i + 1} has {len(body[i].split()) - 1} values for {len(names)} attribute names"
        )
    ids = [line.split(None, 1)[0] for line in body]
    if not body:
        return ids, names, np.zeros((0, len(names)), dtype=np.int8)
    try:
        values = np.loadtxt(io.StringIO("\n".join(body)), usecols=range(1, len(names) + 1), dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataFormatError(f"{path!r}: non-integer attribute value ({e})") from None
    return ids, names, _signs_to_bits(values, path)


def _read_csv(path: str, required: tuple) -> tuple[list, list]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataFormatError(f"{path!r} is empty; expected a header {','.join(required)},…") from None
        rows = [r for r in reader if r]
    missing = [c for c in required if c not in header]
    if missing:
        shown = ",".join(header[:6]) + (",…" if len(header) > 6 else "")
        raise DataFormatError(f"{path!r}: missing column(s) {missing}; the header is {shown!r}")
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise DataFormatError(f"{path!r}: data row {bad + 1} has {len(rows[bad])} fields, header has {len(header)}")
    return header, rows


def _parse_attr_csv(path: str):
    with open(path) as f:
        text = f.read()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataFormatError(f"{path!r} is empty; expected a header image_id,<40 attribute names>")
    header = [h.strip() for h in lines[0].split(",")]
    if "image_id" not in header:
        raise DataFormatError(f"{path!r}: missing column(s) ['image_id']; the header starts {','.join(header[:4])!r}")
    body = lines[1:]
    # Kaggle's file has no quoted fields, so counting commas checks every row's width at once.
    if text.count(",") != (len(header) - 1) * len(lines):
        i = next(i for i, line in enumerate(body) if line.count(",") != len(header) - 1)
        raise DataFormatError(
            f"{path!r}: data row {i + 1} has {body[i].count(',') + 1} fields, header has {len(header)}"
        )
    id_col = header.index("image_id")
    cols = [i for i, h in enumerate(header) if h != "image_id"]
    names = [header[i] for i in cols]
    ids = [line.split(",")[id_col].strip() for line in body]
    if not body:
        return ids, names, np.zeros((0, len(names)), dtype=np.int8)
    try:
        values = np.loadtxt(io.StringIO("\n".join(body)), delimiter=",", usecols=cols, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataFormatError(f"{path!r}: non-integer attribute value ({e})") from None
    return ids, names, _signs_to_bits(values, path)


def _parse_partition(path: str, csv_layout: bool):
    if csv_layout:
        header, rows = _read_csv(path, ("image_id", "partition"))
        pairs = [(r[header.index("image_id")], r[header.index("partition")]) for r in rows]
    else:
        with open(path) as f:
            rows = [line.split() for line in f if line.strip()]
        bad = next((i for i, r in enumerate(rows) if len(r) != 2), None)
        if bad is not None:
            raise DataFormatError(f"{path!r}: line {bad + 1} should be '<image> <0|1|2>', got {' '.join(rows[bad])!r}")
        pairs = [(r[0], r[1]) for r in rows]
    try:
        part = {k: int(v) for k, v in pairs}
    except ValueError as e:
        raise DataFormatError(f"{path!r}: partition values must be 0, 1 or 2 ({e})") from None
    if set(part.values()) - {0, 1, 2}:
        raise DataFormatError(f"{path!r}: partition values must be 0, 1 or 2, found {sorted(set(part.values()))}")
    return part


def _image_dir(root: str) -> str:
    nested = os.path.join(root, "img_align_celeba", "img_align_celeba")
    return nested if os.path.isdir(nested) else os.path.join(root, "img_align_celeba")


def read_celeba_metadata(root: str) -> CelebAMetadata:
    """Parse the attribute and partition files of a CelebA folder (text layout preferred, else CSV)."""
    for base in (root, os.path.join(root, "celeba")):
        txt = os.path.join(base, "list_attr_celeba.txt")
        csv_path = os.path.join(base, "list_attr_celeba.csv")
        if os.path.isfile(txt) or os.path.isfile(csv_path):
            break
    else:
        raise FileNotFoundError(f"missing data file {os.path.join(root, 'list_attr_celeba.txt')!r} (or .csv): {_HINT}")
    csv_layout = not os.path.isfile(txt)
    attr_path = csv_path if csv_layout else txt
    ids, names, bits = (_parse_attr_csv if csv_layout else _parse_attr_txt)(attr_path)
    part_path = os.path.join(base, "list_eval_partition." + ("csv" if csv_layout else "txt"))
    if not os.path.isfile(part_path):
        raise FileNotFoundError(f"missing data file {part_path!r}: {_HINT}")
    part = _parse_partition(part_path, csv_layout)
    missing = [i for i in ids if i not in part]
    if missing:
        raise DataFormatError(
            f"{part_path!r}: no partition for {len(missing)} image(s) listed in {attr_path!r} (first: {missing[0]})"
        )
    partition = np.array([part[i] for i in ids], dtype=np.int64)
    return CelebAMetadata(ids, names, bits, partition, _image_dir(base))


def _column(meta: CelebAMetadata, name: str, path_hint: str) -> np.ndarray:
    if name not in meta.attribute_names:
        raise DataFormatError(
            f"CelebA attribute file in {path_hint!r} has no attribute {name!r}; "
            f"available: {', '.join(meta.attribute_names)}"
        )
    return meta.attributes[:, meta.attribute_names.index(name)].astype(np.int64)


def load_celeba(
    root: str,
    split: str = "train",
    *,
    target: str = "Blond_Hair",
    spurious: str = "Male",
    n_images: Optional[int] = None,
    seed: Optional[int] = None,
    per_group: Optional[int] = None,
    group_seed: int = 0,
    image_size: int = 64,
    crop: str = "center_square",
    normalize: bool = True,
    device=None,
    workers: int = 8,
) -> AttributeLabeled:
    """Load one CelebA split as ``AttributeLabeled(x, y, attribute, index)``.

    y = ``target`` attribute (default Blond_Hair, index 9), attribute = ``spurious``
    (default Male, index 20), both in {0, 1}; index = row in the attribute file.
    x: (n, 3, image_size, image_size) float32.

    Selection, applied to the metadata before any image is decoded:
      1. ``n_images``: keep that many images of the split (the paper trains on 20 000, the
         authors' code on 15 000): the first ones in file order, or a uniform sample when
         ``seed`` is given.
      2. ``per_group``: then keep a balanced set of that many per (y, attribute) group
         (180 in the paper), drawn with ``group_seed``; short groups are taken whole with a warning.
    Images: ``crop="center_square"`` takes the central 178×178 square and resizes it
    (bilinear) to ``image_size``; ``"resize"`` resizes the full 178×218 frame.
    ``normalize``: per-channel ImageNet statistics (``IMAGENET_MEAN``/``IMAGENET_STD``)
    after scaling to [0, 1]; ``False`` keeps [0, 1].
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    meta = read_celeba_metadata(root)
    y_all = _column(meta, target, root)
    a_all = _column(meta, spurious, root)
    rows = np.flatnonzero(meta.partition == SPLITS[split])
    rows = rows[select_rows(len(rows), n_images, seed, f"CelebA {split}")]
    if per_group is not None:
        chosen = balanced_group_indices(y_all[rows], a_all[rows], per_group, seed=group_seed).indices.numpy()
        rows = rows[chosen]
    paths = [os.path.join(meta.image_dir, meta.image_ids[r]) for r in rows]
    x = load_images(paths, image_size, crop, workers)
    if normalize:
        x = normalize_channels(x, IMAGENET_MEAN, IMAGENET_STD)
    return AttributeLabeled(
        to_device(x, device),
        long_tensor(y_all[rows], device),
        long_tensor(a_all[rows], device),
        long_tensor(rows, device),
    )
