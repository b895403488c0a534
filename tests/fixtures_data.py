"""Writers of tiny datasets in the exact on-disk layouts of the real ones (for tmp_path)."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np

# The 40 CelebA attributes, in the order of list_attr_celeba.txt (Blond_Hair = 9, Male = 20).
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
WATERBIRDS_HEADER = "img_id,img_filename,y,split,place,place_filename"


def _dump(obj: dict, path: str, bytes_keys: bool) -> None:
    if bytes_keys:
        obj = {k.encode("latin1"): (v.encode("latin1") if isinstance(v, str) else v) for k, v in obj.items()}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: str, rows_per_batch: int = 4, *, seed: int = 0, bytes_keys: bool = True, labels=None):
    """Write cifar-10-batches-py/ under root with random uint8 images.

    Returns (train_data (5·r, 3072), train_labels, test_data (r, 3072), test_labels).
    ``labels``: optional (5·r,) training labels to use instead of random ones.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    _dump({"num_cases_per_batch": rows_per_batch, "label_names": CIFAR_NAMES, "num_vis": 3072},
          os.path.join(folder, "batches.meta"), bytes_keys)
    train_labels = rng.integers(0, 10, 5 * rows_per_batch) if labels is None else np.asarray(labels)
    train_data = rng.integers(0, 256, (5 * rows_per_batch, 3072), dtype=np.uint8)
    for i in range(5):
        part = slice(i * rows_per_batch, (i + 1) * rows_per_batch)
        _dump({"batch_label": f"training batch {i + 1} of 5", "labels": [int(v) for v in train_labels[part]],
               "data": train_data[part], "filenames": [f"img_{j}.png" for j in range(rows_per_batch)]},
              os.path.join(folder, f"data_batch_{i + 1}"), bytes_keys)
    test_labels = rng.integers(0, 10, rows_per_batch)
    test_data = rng.integers(0, 256, (rows_per_batch, 3072), dtype=np.uint8)
    _dump({"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in test_labels], "data": test_data,
           "filenames": [f"t_{j}.png" for j in range(rows_per_batch)]},
          os.path.join(folder, "test_batch"), bytes_keys)
    return train_data, np.asarray(train_labels), test_data, test_labels


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array in idx format (gzip-compressed when path ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def write_fashion_mnist(root: str, n_train: int = 6, n_test: int = 3, *, seed: int = 0):
    """Write the four Fashion-MNIST .gz idx files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)
        arrays[prefix] = (images, labels)
    return arrays


def _solid_jpeg(path: str, size: tuple, color, band_color=None, band: int = 0) -> None:
    from PIL import Image

    w, h = size
    pixels = np.empty((h, w, 3), dtype=np.uint8)
    pixels[:] = color
    if band:
        pixels[:band] = band_color
        pixels[h - band:] = band_color
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def celeba_colors(n: int) -> np.ndarray:
    """Distinct solid RGB colors, one per fixture image."""
    base = 40 + 15 * np.arange(n)[:, None] + np.array([0, 30, 60])
    return (base % 200).astype(np.uint8)


def write_celeba(root: str, attributes: np.ndarray, partition, *, layout: str = "txt", images: bool = True,
                 count=None) -> list:
    """Write a CelebA folder: attribute file, partition file and 178×218 jpgs.

    attributes: (n, 40) in {0, 1} (written as ±1); partition: (n,) in {0, 1, 2}.
    Each image is a solid ``celeba_colors`` colour with 20-pixel white bands at top and
    bottom (cut away by the centre-square crop). ``count`` overrides the txt count line.
    Returns the image ids.
    """
    n = len(attributes)
    ids = [f"{i + 1:06d}.jpg" for i in range(n)]
    signs = np.where(np.asarray(attributes) > 0, 1, -1)
    os.makedirs(root, exist_ok=True)
    if layout == "txt":
        with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
            f.write(f"{n if count is None else count}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n")
            for img, row in zip(ids, signs):
                f.write(img + " " + " ".join(f"{v:2d}" for v in row) + "\n")
        with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
            f.writelines(f"{img} {p}\n" for img, p in zip(ids, partition))
    else:
        with open(os.path.join(root, "list_attr_celeba.csv"), "w") as f:
            f.write("image_id," + ",".join(CELEBA_ATTRIBUTES) + "\n")
            f.writelines(img + "," + ",".join(str(v) for v in row) + "\n" for img, row in zip(ids, signs))
        with open(os.path.join(root, "list_eval_partition.csv"), "w") as f:
            f.write("image_id,partition\n")
            f.writelines(f"{img},{p}\n" for img, p in zip(ids, partition))
    if images:
        for img, color in zip(ids, celeba_colors(n)):
            _solid_jpeg(os.path.join(root, "img_align_celeba", img), (178, 218), color, (255, 255, 255), 20)
    return ids


def write_waterbirds(root: str, y, split, place, *, header: str = WATERBIRDS_HEADER) -> str:
    """Write waterbird_complete95_forest2water2/ with metadata.csv and species-folder jpgs.

    Image i is a solid colour (10·i mod 256, 100, 200 − 10·i mod 200) of size 96×72.
    Returns the dataset folder.
    """
    folder = os.path.join(root, "waterbird_complete95_forest2water2")
    os.makedirs(folder, exist_ok=True)
    species = {1: "045.Northern_Fulmar/Northern_Fulmar_{:04d}_{}.jpg",
               0: "094.White_breasted_Nuthatch/White_Breasted_Nuthatch_{:04d}_{}.jpg"}
    places = {1: "/o/ocean/{:08d}.jpg", 0: "/b/bamboo_forest/{:08d}.jpg"}
    lines = [header]
    for i, (yi, si, pi) in enumerate(zip(y, split, place)):
        name = species[int(yi)].format(i + 1, 1000 + i)
        lines.append(f"{i + 1},{name},{int(yi)},{int(si)},{int(pi)},{places[int(pi)].format(i + 1)}")
        _solid_jpeg(os.path.join(folder, name), (96, 72), ((10 * i) % 256, 100, 200 - (10 * i) % 200))
    with open(os.path.join(folder, "metadata.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return folder
