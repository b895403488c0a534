"""Loaders of the real on-disk formats, run on tiny fixtures written in those formats."""
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

import fasttangent.data as D

try:
    from .fixtures_data import (CELEBA_ATTRIBUTES, celeba_colors, write_celeba, write_cifar10, write_fashion_mnist,
                                write_idx, write_waterbirds)
except ImportError:
    from fixtures_data import (CELEBA_ATTRIBUTES, celeba_colors, write_celeba, write_cifar10, write_fashion_mnist,
                               write_idx, write_waterbirds)

CSCORES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-cscores-orig-order.npz")
FASHION = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_pixel_layout_and_order(tmp_path, bytes_keys):
    train_data, train_labels, test_data, test_labels = write_cifar10(str(tmp_path), 3, bytes_keys=bytes_keys)
    x, y = D.load_cifar10(str(tmp_path), "train", normalize=False)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == train_labels.tolist()
    # Row layout R(1024) G(1024) B(1024), each plane row-major 32×32, checked pixel by pixel.
    for i, c, r, col in [(0, 0, 0, 0), (4, 1, 5, 7), (14, 2, 31, 31), (7, 2, 0, 31), (9, 0, 31, 0)]:
        assert x[i, c, r, col].item() == pytest.approx(train_data[i, c * 1024 + r * 32 + col] / 255.0)
    xn, _ = D.load_cifar10(str(tmp_path / "cifar-10-batches-py"), "test")
    c, r, col = 1, 3, 4
    expect = (test_data[2, c * 1024 + r * 32 + col] / 255.0 - D.CIFAR10_MEAN[c]) / D.CIFAR10_STD[c]
    assert xn[2, c, r, col].item() == pytest.approx(expect, rel=1e-5)
    assert D.read_cifar10_labels(str(tmp_path), "test").tolist() == test_labels.tolist()
    assert D.read_cifar10_meta(str(tmp_path))["label_names"][9] == "truck"


def test_cifar10_subsets(tmp_path):
    _, labels, _, _ = write_cifar10(str(tmp_path), 4)
    assert D.load_cifar10(str(tmp_path), limit=5).y.tolist() == labels[:5].tolist()
    a = D.load_cifar10(str(tmp_path), limit=6, seed=3).y
    b = D.load_cifar10(str(tmp_path), limit=6, seed=3).y
    assert a.tolist() == b.tolist() and len(a) == 6
    picked = D.load_cifar10(str(tmp_path), indices=[19, 0, 7], normalize=False)
    full = D.load_cifar10(str(tmp_path), normalize=False)
    assert torch.equal(picked.x, full.x[[19, 0, 7]]) and picked.y.tolist() == labels[[19, 0, 7]].tolist()


def test_cifar10_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="batches.meta"):
        D.load_cifar10(str(tmp_path))
    write_cifar10(str(tmp_path), 4)
    folder = tmp_path / "cifar-10-batches-py"
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DataFormatError, match="data_batch_3.*truncated"):
        D.load_cifar10(str(tmp_path))
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        D.load_cifar10(str(tmp_path))
    write_cifar10(str(tmp_path), 4)
    with open(folder / "data_batch_2", "wb") as f:  # one image more than batches.meta announces
        pickle.dump({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0] * 5}, f, protocol=2)
    with pytest.raises(D.DataFormatError, match="data_batch_2.*5 images.*num_cases_per_batch = 4"):
        D.load_cifar10(str(tmp_path))
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, f, protocol=2)
    with pytest.raises(D.DataFormatError, match="3 labels for 4 images"):
        D.load_cifar10(str(tmp_path))
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"labels": [0] * 4}, f, protocol=2)
    with pytest.raises(D.DataFormatError, match="data_batch_2.*no key 'data'"):
        D.load_cifar10(str(tmp_path))


# ----------------------------------------------------------------------------------------- C-scores
@pytest.mark.skipif(not os.path.isfile(CSCORES), reason="shared C-score file absent")
def test_cscores_label_check_on_real_file():
    with np.load(CSCORES) as npz:
        real_labels, real_scores = npz["labels"], npz["scores"]
    scores = D.load_cscores(CSCORES, cifar_labels=torch.as_tensor(real_labels))
    assert scores.shape == (50000,) and scores.dtype == torch.float64
    assert np.array_equal(scores.numpy(), real_scores)
    wrong = real_labels.copy()
    wrong[[10, 20, 30]] = (wrong[[10, 20, 30]] + 1) % 10
    with pytest.raises(D.DataFormatError, match=r"cifar10-cscores-orig-order.npz.*at 3 of 50000 positions \(first at index 10"):
        D.load_cscores(CSCORES, cifar_labels=wrong)
    with pytest.raises(D.DataFormatError, match="50000 C-score labels but 49999"):
        D.load_cscores(CSCORES, cifar_labels=real_labels[1:])


def test_cscores_against_cifar_folder(tmp_path):
    _, labels, _, _ = write_cifar10(str(tmp_path), 4)
    scores = np.linspace(0, 1, 20)
    good, bad, broken = tmp_path / "good.npz", tmp_path / "bad.npz", tmp_path / "broken.npz"
    np.savez(good, labels=labels.astype(np.int64), scores=scores)
    assert np.allclose(D.load_cscores(str(good), cifar_root=str(tmp_path)).numpy(), scores)
    shuffled = labels.copy()
    shuffled[0] = (shuffled[0] + 1) % 10
    np.savez(bad, labels=shuffled, scores=scores)
    with pytest.raises(D.DataFormatError, match="bad.npz.*at 1 of 20 positions"):
        D.load_cscores(str(bad), cifar_root=str(tmp_path))
    np.savez(broken, labels=labels)
    with pytest.raises(D.DataFormatError, match=r"broken.npz.*\['scores'\]"):
        D.load_cscores(str(broken))
    broken.write_bytes(good.read_bytes()[:100])
    with pytest.raises(D.DataFormatError, match="broken.npz.*truncated"):
        D.load_cscores(str(broken))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        D.load_cscores(str(tmp_path / "missing.npz"))


# ----------------------------------------------------------------------------------------- CelebA
def _celeba_table(n=12, seed=0):
    rng = np.random.default_rng(seed)
    attrs = rng.integers(0, 2, (n, 40))
    partition = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2])[:n]
    return attrs, partition


@pytest.mark.parametrize("layout", ["txt", "csv"])
def test_celeba_layouts(tmp_path, layout):
    attrs, partition = _celeba_table()
    assert CELEBA_ATTRIBUTES.index("Blond_Hair") == 9 and CELEBA_ATTRIBUTES.index("Male") == 20
    write_celeba(str(tmp_path), attrs, partition, layout=layout)
    meta = D.read_celeba_metadata(str(tmp_path))
    assert meta.attribute_names == CELEBA_ATTRIBUTES and np.array_equal(meta.attributes, attrs)
    assert meta.partition.tolist() == partition.tolist()
    train = D.load_celeba(str(tmp_path), "train", image_size=16, normalize=False)
    rows = np.flatnonzero(partition == 0)
    assert train.index.tolist() == rows.tolist()
    assert train.y.tolist() == attrs[rows, 9].tolist() and train.attribute.tolist() == attrs[rows, 20].tolist()
    assert train.x.shape == (7, 3, 16, 16)
    # The centre-square crop drops the 20-pixel white bands: every pixel is the image's solid colour.
    colors = celeba_colors(12)[rows] / 255.0
    assert torch.allclose(train.x.mean((2, 3)), torch.as_tensor(colors, dtype=torch.float32), atol=0.03)
    full_frame = D.load_celeba(str(tmp_path), "test", image_size=16, crop="resize", normalize=False)
    assert full_frame.x[:, :, 0].min() > 0.9  # the top row shows the white band
    other = D.load_celeba(str(tmp_path), "valid", target="Smiling", spurious="Young", image_size=8)
    assert other.y.tolist() == attrs[[7, 8], 31].tolist() and other.attribute.tolist() == attrs[[7, 8], 39].tolist()


def test_celeba_selection(tmp_path):
    rng = np.random.default_rng(1)
    attrs = rng.integers(0, 2, (40, 40))
    attrs[:, 9] = np.arange(40) % 2
    attrs[:, 20] = (np.arange(40) // 2) % 2
    write_celeba(str(tmp_path), attrs, np.zeros(40, int), images=True)
    first = D.load_celeba(str(tmp_path), n_images=15, image_size=8)
    assert first.index.tolist() == list(range(15))
    sample = D.load_celeba(str(tmp_path), n_images=15, seed=4, image_size=8)
    assert len(sample.index) == 15 and sample.index.tolist() == sorted(set(sample.index.tolist()))
    balanced = D.load_celeba(str(tmp_path), per_group=3, image_size=8)
    groups = D.group_index(balanced.y, balanced.attribute)
    assert torch.bincount(groups, minlength=4).tolist() == [3, 3, 3, 3]
    assert balanced.y.tolist() == attrs[balanced.index.numpy(), 9].tolist()


def test_celeba_bad_files(tmp_path):
    attrs, partition = _celeba_table()
    with pytest.raises(FileNotFoundError, match="list_attr_celeba"):
        D.read_celeba_metadata(str(tmp_path))
    write_celeba(str(tmp_path), attrs, partition, images=False, count=13)
    with pytest.raises(D.DataFormatError, match="list_attr_celeba.txt.*says 13 images.*lists 12"):
        D.read_celeba_metadata(str(tmp_path))
    write_celeba(str(tmp_path), attrs, partition, images=False)
    attr_file = tmp_path / "list_attr_celeba.txt"
    good = attr_file.read_text()
    lines = good.splitlines()
    attr_file.write_text("\n".join(lines[:5] + [" ".join(lines[5].split()[:-1])] + lines[6:]) + "\n")
    with pytest.raises(D.DataFormatError, match="image line 4 has 39 values for 40 attribute names"):
        D.read_celeba_metadata(str(tmp_path))
    attr_file.write_text("\n".join(lines[:3] + [lines[3][:-2] + " 0"] + lines[4:]) + "\n")
    with pytest.raises(D.DataFormatError, match="values must be -1 or 1; data row 2 has 0"):
        D.read_celeba_metadata(str(tmp_path))
    attr_file.write_text(good)
    with pytest.raises(D.DataFormatError, match="no attribute 'Blond'"):
        D.load_celeba(str(tmp_path), target="Blond")
    with pytest.raises(FileNotFoundError, match="img_align_celeba.*000001.jpg"):
        D.load_celeba(str(tmp_path))
    os.remove(tmp_path / "list_eval_partition.txt")
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        D.read_celeba_metadata(str(tmp_path))
    csv_dir = tmp_path / "csv"
    write_celeba(str(csv_dir), attrs, partition, layout="csv", images=False)
    text = (csv_dir / "list_attr_celeba.csv").read_text().replace("Blond_Hair,", "")
    (csv_dir / "list_attr_celeba.csv").write_text(text)
    with pytest.raises(D.DataFormatError, match="list_attr_celeba.csv'?: data row 1 has 41 fields, header has 40"):
        D.read_celeba_metadata(str(csv_dir))
    # A file without the Blond_Hair column (header and values) parses, but the target is missing.
    header, *rows = (csv_dir / "list_attr_celeba.csv").read_text().splitlines()
    rows = [",".join(r.split(",")[:10] + r.split(",")[11:]) for r in rows]
    (csv_dir / "list_attr_celeba.csv").write_text("\n".join([header] + rows) + "\n")
    with pytest.raises(D.DataFormatError, match="no attribute 'Blond_Hair'; available: 5_o_Clock_Shadow"):
        D.load_celeba(str(csv_dir))
    (csv_dir / "list_eval_partition.csv").write_text("image,partition\n000001.jpg,0\n")
    with pytest.raises(D.DataFormatError, match=r"list_eval_partition.csv.*missing column\(s\) \['image_id'\]"):
        D.read_celeba_metadata(str(csv_dir))


# ----------------------------------------------------------------------------------------- Waterbirds
def _waterbirds_table():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0])
    place = np.array([1, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0])
    split = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    return y, split, place


def test_waterbirds_metadata_and_images(tmp_path):
    y, split, place = _waterbirds_table()
    folder = write_waterbirds(str(tmp_path), y, split, place)
    meta = D.read_waterbirds_metadata(str(tmp_path))
    assert meta["y"].tolist() == y.tolist() and meta["place"].tolist() == place.tolist()
    assert meta["img_filename"][0].startswith("045.Northern_Fulmar/")
    train = D.load_waterbirds(folder, "train", image_size=16, normalize=False)
    assert train.index.tolist() == list(range(7)) and train.x.shape == (7, 3, 16, 16)
    assert train.y.tolist() == y[:7].tolist() and train.attribute.tolist() == place[:7].tolist()
    expect = torch.tensor([[(10 * i) % 256, 100, 200 - (10 * i) % 200] for i in range(7)], dtype=torch.float32) / 255
    assert torch.allclose(train.x.mean((2, 3)), expect, atol=0.03)
    test = D.load_waterbirds(str(tmp_path), "test", image_size=8)
    assert test.index.tolist() == [9, 10, 11]
    with pytest.warns(UserWarning, match="fewer than 2"):
        balanced = D.load_waterbirds(str(tmp_path), "train", per_group=2, image_size=8)
    counts = torch.bincount(D.group_index(balanced.y, balanced.attribute), minlength=4).tolist()
    assert counts == [2, 1, 1, 2]  # (land, land) 3 → 2, (land, water) 1, (water, land) 1, (water, water) 2


def test_waterbirds_bad_metadata(tmp_path):
    y, split, place = _waterbirds_table()
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        D.read_waterbirds_metadata(str(tmp_path))
    write_waterbirds(str(tmp_path), y, split, place, header="img_id,img_filename,y,split,background,place_filename")
    with pytest.raises(D.DataFormatError, match=r"metadata.csv.*missing column\(s\) \['place'\]"):
        D.read_waterbirds_metadata(str(tmp_path))
    write_waterbirds(str(tmp_path), y, np.where(split == 2, 3, split), place)
    with pytest.raises(D.DataFormatError, match="column 'split' must take values in"):
        D.read_waterbirds_metadata(str(tmp_path))


# ----------------------------------------------------------------------------------------- idx / Fashion-MNIST / digits
def test_fashion_mnist_fixture(tmp_path):
    arrays = write_fashion_mnist(str(tmp_path), 6, 3)
    x, y = D.load_fashion_mnist(str(tmp_path), "train", normalize=False)
    images, labels = arrays["train"]
    assert x.shape == (6, 1, 28, 28) and y.tolist() == labels.tolist()
    assert torch.allclose(x[:, 0], torch.as_tensor(images, dtype=torch.float32) / 255)
    xt, _ = D.load_fashion_mnist(str(tmp_path), "test", flatten=True)
    expect = (arrays["t10k"][0].reshape(3, 784) / 255.0 - D.FASHION_MNIST_MEAN) / D.FASHION_MNIST_STD
    assert np.allclose(xt.numpy(), expect, atol=1e-5)


def test_idx_errors(tmp_path):
    write_fashion_mnist(str(tmp_path), 6, 3)
    labels_path = str(tmp_path / "train-labels-idx1-ubyte.gz")
    write_idx(labels_path, np.zeros(5, np.uint8))
    with pytest.raises(D.DataFormatError, match="train-labels-idx1-ubyte.gz'? has 5 labels but .* has 6 images"):
        D.load_fashion_mnist(str(tmp_path))
    images_path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = images_path.read_bytes()
    images_path.write_bytes(raw[: len(raw) - 20])
    with pytest.raises(D.DataFormatError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        D.load_fashion_mnist(str(tmp_path), "test")
    plain = tmp_path / "short-idx1"
    write_idx(str(plain), np.arange(10, dtype=np.uint8))
    plain.write_bytes(plain.read_bytes()[:-1])
    with pytest.raises(D.DataFormatError, match=r"sizes \(10,\) = 10 values but the file holds 9"):
        D.read_idx(str(plain))
    plain.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 0]))
    with pytest.raises(D.DataFormatError, match="type byte is 0x0d"):
        D.read_idx(str(plain))
    plain.write_bytes(bytes([8, 3, 0, 0]))
    with pytest.raises(D.DataFormatError, match="bad idx magic"):
        D.read_idx(str(plain))
    write_idx(str(plain), np.zeros((2, 3), np.uint8))
    with pytest.raises(D.DataFormatError, match="2 dimensions, expected 1"):
        D.read_idx(str(plain), ndim=1)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        D.load_fashion_mnist(str(tmp_path / "nowhere"))


@pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    x, y = D.load_fashion_mnist(split="train", normalize=False)
    assert x.shape == (60000, 1, 28, 28) and torch.bincount(y).tolist() == [6000] * 10
    assert 0.0 <= x.min() and x.max() <= 1.0
    # The documented normalization constants are the training-set statistics.
    assert x.mean().item() == pytest.approx(D.FASHION_MNIST_MEAN, abs=5e-4)
    assert x.std().item() == pytest.approx(D.FASHION_MNIST_STD, abs=5e-4)
    xt, yt = D.load_fashion_mnist(split="test", limit=100, seed=0)
    assert xt.shape == (100, 1, 28, 28) and yt.max() <= 9


def test_digits():
    x, y = D.load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert abs(x.mean().item()) < 1e-5 and x.std().item() == pytest.approx(1.0, abs=1e-4)
    raw, _ = D.load_digits(normalize=False, flatten=True)
    assert raw.shape == (1797, 64) and raw.min() == 0.0 and raw.max() == 1.0


def test_device_argument(tmp_path):
    write_cifar10(str(tmp_path), 2)
    x, y = D.load_cifar10(str(tmp_path), device="cpu")
    assert x.device.type == "cpu" and y.device.type == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.load_digits(device=torch.device("cpu"))


def test_device_fallback_when_out_of_memory(tmp_path, monkeypatch):
    write_cifar10(str(tmp_path), 2)
    real_to = torch.Tensor.to

    def to_without_room_on_gpu(self, *args, **kwargs):
        if args and str(args[0]) == "cuda:0":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_without_room_on_gpu)
    with pytest.warns(RuntimeWarning, match="does not fit on cuda:0; keeping it on the CPU"):
        x, _ = D.load_cifar10(str(tmp_path), device="cuda:0")
    assert x.device.type == "cpu" and x.shape == (10, 3, 32, 32)
