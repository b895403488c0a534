"""Real datasets available offline on these machines: Fashion-MNIST (idx files of the
Debian package ``dataset-fashion-mnist``) and scikit-learn's 8×8 digits.

idx format (big-endian): two zero bytes, a type byte (0x08 = unsigned byte), a byte with
the number of dimensions d, then d int32 sizes, then the values in row-major order.
Images are ``idx3`` (n, 28, 28), labels ``idx1`` (n,).
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional

import numpy as np
import torch

from ._common import DataFormatError, Labeled, select_rows, to_device

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Mean and standard deviation of the 60 000 Fashion-MNIST training pixels, scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_HINT = "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass root="


def read_idx(path: str, ndim: Optional[int] = None) -> np.ndarray:
    """Parse an idx file (gzip-compressed if the name ends in .gz) of unsigned bytes.

    Checks the magic number (0x0000 08 d), the dimension count ``ndim`` when given, and that
    the payload holds exactly prod(sizes) values. Returns a uint8 array of those sizes.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing data file {path!r}: {_HINT}")
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path!r} is truncated or not a valid gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(f"{path!r}: bad idx magic number {raw[:4].hex()!r}; expected 0000 08 0d")
    if raw[2] != 0x08:
        raise DataFormatError(f"{path!r}: idx type byte is 0x{raw[2]:02x}; only 0x08 (unsigned byte) is supported")
    d = raw[3]
    if ndim is not None and d != ndim:
        raise DataFormatError(f"{path!r}: idx file has {d} dimensions, expected {ndim}")
    header = 4 + 4 * d
    if len(raw) < header:
        raise DataFormatError(f"{path!r}: truncated idx header ({len(raw)} bytes for {d} dimension sizes)")
    sizes = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=d, offset=4))
    expected = int(np.prod(sizes, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataFormatError(
            f"{path!r}: header declares sizes {sizes} = {expected} values but the file holds {len(raw) - header}; "
            "it is truncated or damaged"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(sizes)


def _idx_path(root: str, stem: str) -> str:
    gz = os.path.join(root, stem + ".gz")
    return gz if os.path.isfile(gz) or not os.path.isfile(os.path.join(root, stem)) else os.path.join(root, stem)


def read_fashion_mnist(root: str = FASHION_MNIST_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST arrays: uint8 images (n, 28, 28) and int64 labels (n,)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_path = _idx_path(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_path(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise DataFormatError(f"{images_path!r}: images are {images.shape[1:]}, expected 28×28")
    if len(labels) != len(images):
        raise DataFormatError(f"{labels_path!r} has {len(labels)} labels but {images_path!r} has {len(images)} images")
    if labels.size and labels.max() > 9:
        raise DataFormatError(f"{labels_path!r}: labels must lie in 0..9, found {labels.max()}")
    return images, labels


def load_fashion_mnist(
    root: str = FASHION_MNIST_DIR,
    split: str = "train",
    *,
    limit: Optional[int] = None,
    seed: Optional[int] = None,
    normalize: bool = True,
    flatten: bool = False,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Labeled:
    """Fashion-MNIST as ``Labeled(x, y)``: x (n, 1, 28, 28) (or (n, 784) with ``flatten``), y (n,) int64.

    Pixels are scaled to [0, 1]; ``normalize`` then standardizes with the training-set
    statistics ``FASHION_MNIST_MEAN``/``FASHION_MNIST_STD``. ``limit``: the first examples,
    or a uniform sample (kept in file order) when ``seed`` is given.
    """
    images, labels = read_fashion_mnist(root, split)
    keep = select_rows(len(labels), limit, seed, f"Fashion-MNIST {split}")
    x = torch.from_numpy(images[keep]).to(dtype).div_(255.0).unsqueeze(1)
    if normalize:
        x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    if flatten:
        x = x.flatten(1)
    return Labeled(to_device(x, device), to_device(torch.from_numpy(labels[keep]), device))


def load_digits(
    *, normalize: bool = True, flatten: bool = False, dtype: torch.dtype = torch.float32, device=None
) -> Labeled:
    """scikit-learn's 1 797 handwritten digits as ``Labeled(x, y)``: x (1797, 1, 8, 8) (or (1797, 64)).

    Pixel values 0..16 are scaled to [0, 1]; ``normalize`` then standardizes with the mean
    and standard deviation of all pixels. There is no official split: use
    :func:`fasttangent.data.holdout_split`.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.as_tensor(bunch.images, dtype=dtype).div_(16.0).unsqueeze(1)
    if normalize:
        x = (x - x.mean()) / x.std()
    if flatten:
        x = x.flatten(1)
    return Labeled(to_device(x, device), to_device(torch.as_tensor(bunch.target, dtype=torch.long), device))
