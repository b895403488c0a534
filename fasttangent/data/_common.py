"""Shared pieces of the data loaders: the error type, file checks, device placement,
image decoding and the result tuples."""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

# ImageNet channel statistics (torchvision's pretrained models expect them); used for
# the CelebA and Waterbirds images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataFormatError(ValueError):
    """A data file exists but its content is not in the expected format.

    The message names the file, what is wrong, and what the loader expected.
    """


class Labeled(NamedTuple):
    """Inputs and integer class labels.

    x: (n, ...) float inputs; y: (n,) int64 labels.
    """

    x: torch.Tensor
    y: torch.Tensor


class AttributeLabeled(NamedTuple):
    """Inputs, binary targets and a binary spurious attribute (CelebA, Waterbirds,
    planted-feature tasks).

    x: (n, ...) float inputs; y: (n,) int64 target in {0, 1}; attribute: (n,) int64
    spurious attribute in {0, 1}; index: (n,) int64 position of each example in its
    source (row of the attribute file / metadata.csv, or of the source array).
    """

    x: torch.Tensor
    y: torch.Tensor
    attribute: torch.Tensor
    index: torch.Tensor


def require_file(path: str, hint: str) -> str:
    """Return ``path`` if it is a file, else raise FileNotFoundError naming it and ``hint``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing data file {path!r}: {hint}")
    return path


def find_dir(root: str, name: str, marker: str, hint: str) -> str:
    """Locate the dataset folder ``name`` given either itself or its parent as ``root``.

    ``marker`` is a file that must exist inside the folder.
    """
    for candidate in (os.path.join(root, name), root):
        if os.path.isfile(os.path.join(candidate, marker)):
            return candidate
    raise FileNotFoundError(
        f"cannot find {os.path.join(root, name, marker)!r} (nor {os.path.join(root, marker)!r}): {hint}"
    )


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Move ``tensor`` to ``device``; if the device runs out of memory, warn and keep it on the CPU."""
    if device is None:
        return tensor
    try:
        return tensor.to(device)
    except torch.cuda.OutOfMemoryError:
        warnings.warn(
            f"a {tuple(tensor.shape)} {tensor.dtype} tensor does not fit on {device}; keeping it on the CPU "
            "(move minibatches to the device instead)",
            RuntimeWarning,
            stacklevel=3,
        )
        return tensor


def long_tensor(values, device) -> torch.Tensor:
    """An int64 tensor of ``values`` (array-like) on ``device``."""
    return to_device(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)), device)


def select_rows(n: int, limit: Optional[int], seed: Optional[int], what: str) -> np.ndarray:
    """Indices of the rows to keep: all, the first ``limit``, or ``limit`` drawn without
    replacement with ``seed`` (returned sorted, so file order is kept)."""
    if limit is None or limit >= n:
        if limit is not None and limit > n:
            warnings.warn(f"{what}: asked for {limit} examples but only {n} exist; using all {n}", stacklevel=3)
        return np.arange(n)
    if limit < 0:
        raise ValueError(f"{what}: the number of examples must be >= 0, got {limit}")
    if seed is None:
        return np.arange(limit)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def normalize_channels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x − mean_c) / std_c for x of shape (n, c, h, w) with values in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _load_rgb(path: str, size: int, crop: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if crop == "center_square":
                # Central square of side min(w, h), then resize: keeps the aspect ratio.
                w, h = img.size
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
            elif crop == "resize_then_center":
                # Sagawa et al.'s Waterbirds transform: resize to a (size·256/224) square, crop the centre.
                big = int(round(size * 256 / 224))
                img = img.resize((big, big), Image.BILINEAR)
                off = (big - size) // 2
                img = img.crop((off, off, off + size, off + size))
            elif crop == "resize":
                img = img.resize((size, size), Image.BILINEAR)
            else:
                raise ValueError(f"unknown crop mode {crop!r}; use 'center_square', 'resize_then_center' or 'resize'")
            return np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing image file {path!r} (listed in the dataset's metadata)") from None
    except OSError as e:
        raise DataFormatError(f"cannot decode image {path!r}: {e}; the file is damaged or not an image") from None


def load_images(paths: Sequence[str], size: int, crop: str, workers: int = 8) -> torch.Tensor:
    """Decode RGB images with PIL into a (n, 3, size, size) float32 tensor in [0, 1].

    Threads are used because PIL releases the GIL while decoding.
    """
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def fill(i):
        out[i] = _load_rgb(paths[i], size, crop)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(fill, range(len(paths))))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
