"""The image experiments end to end: paper-scale configs on tiny fixture data (a few steps on
the CPU), CPU-scale configs on a few real Fashion-MNIST images, and the helpers they share."""
import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttangent.data import FASHION_MNIST_DIR
from fasttangent.reproduce import _image_common as common
from fasttangent.train import load_config

from fixtures_data import CELEBA_ATTRIBUTES, write_celeba, write_cifar10, write_waterbirds

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("cscores", "labelnoise", "celeba", "waterbirds")
FAST = ["--set", "progress=false", "--set", "device=\"cpu\"", "--set", "checkpoint_every=0"]


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _main(exp_id):
    import importlib
    return importlib.import_module(f"fasttangent.reproduce.{exp_id}").main


def _check_run(out, alphas, groups, figure):
    rows = _rows(out)
    assert sorted({r["alpha"] for r in rows}) == sorted(alphas)
    for row in rows:
        assert set(groups) <= set(row["groups"])
        assert set(row["metrics"]) == {"sign_similarity", "ntk_alignment", "repr_alignment"}
    # fork protocol: every α starts from the same θ0, where f^α = f_θ0, so the step-0 rows agree
    starts = [r for r in rows if r["step"] == 0]
    assert len(starts) == len(alphas)
    for row in starts[1:]:
        for g in groups:
            assert row["groups"][g]["loss"] == pytest.approx(starts[0]["groups"][g]["loss"], rel=1e-4)
        assert row["metrics"] == pytest.approx({m: 1.0 for m in row["metrics"]}, abs=1e-5)
    assert (Path(out) / figure).stat().st_size > 0
    summary = json.loads((Path(out) / "summary.json").read_text())
    assert summary["figures"]
    return rows, summary


@pytest.mark.parametrize("exp_id", EXPERIMENTS)
def test_configs_are_valid_train_configs(exp_id):
    for scale in ("paper", "cpu"):
        path = REPO / "experiments" / exp_id / f"config-{scale}.toml"
        config = load_config(path)
        assert config.task == f"fasttangent.reproduce.{exp_id}:task"
        assert (REPO / "experiments" / exp_id / "README.md").exists()


def test_paper_settings_are_the_papers():
    c = load_config(REPO / "experiments" / "cscores" / "config-paper.toml")
    assert (c.alphas, c.lr, c.momentum, c.batch_size, c.steps) == ([1.0, 100.0], 0.01, 0.9, 125, [64000, 320000])
    assert (c.probe_size, c.probe_outputs, c.task_args["model"]) == (100, "full", "cifar_resnet18")
    assert c.steps[0] * c.batch_size / c.task_args["n_train"] == 200          # 200 epochs
    n = load_config(REPO / "experiments" / "labelnoise" / "config-paper.toml")
    assert n.task_args["noise"] == 0.15 and (n.lr, n.momentum, n.batch_size) == (0.01, 0.9, 125)
    a = load_config(REPO / "experiments" / "celeba" / "config-paper.toml")
    assert (a.alphas, a.lr, a.momentum, a.batch_size) == ([0.5, 1.0, 100.0], 0.01, 0.9, 100)
    assert (a.task_args["n_train"], a.task_args["per_group"]) == (20000, 180)
    w = load_config(REPO / "experiments" / "waterbirds" / "config-paper.toml")
    assert (w.alphas, w.lr, w.momentum, w.batch_size) == ([0.5, 1.0, 100.0], 0.001, 0.9, 100)
    assert w.task_args["model"] == "pretrained_resnet18"


# ----------------------------------------------------------------------------- paper scale, fixture data


@pytest.mark.slow      # a ResNet18 and its NTK on the CPU: minutes on 2 shared cores
def test_cscores_paper_config_end_to_end(tmp_path):
    _, labels, _, _ = write_cifar10(str(tmp_path), rows_per_batch=4)
    scores = np.random.default_rng(0).random(20)
    np.savez(tmp_path / "cifar10-cscores-orig-order.npz", labels=labels, scores=scores)
    out = tmp_path / "run"
    args = ["--scale", "paper", "--data-dir", str(tmp_path), "--out", str(out), *FAST, "--set", "steps=[2,2]",
            "--set", "task_args.n_train=10", "--set", "task_args.n_heldout=10", "--set", "batch_size=5",
            "--set", "probe_size=2"]
    assert _main("cscores")(args) == 0
    groups = [f"train_d{k}" for k in range(10)] + [f"heldout_d{k}" for k in range(10)]
    rows, summary = _check_run(out, [1.0, 100.0], groups, "cscores.png")
    assert max(r["step"] for r in rows) == 2
    # deciles follow the scores: decile k holds the training example of rank k (one each here)
    config = load_config(REPO / "experiments" / "cscores" / "config-paper.toml",
                         [f"--task_args.data_dir={json.dumps(str(tmp_path))}", "--task_args.n_train=10",
                          "--task_args.n_heldout=10", f"--out={json.dumps(str(out))}"])
    from fasttangent.reproduce.cscores import task
    t = task(config)
    ranks = np.argsort(scores[:10], kind="stable")
    assert [int(t.groups[f"train_d{k}"][0]) for k in range(10)] == ranks.tolist()


def test_cscores_paper_config_rejects_misordered_scores(tmp_path):
    _, labels, _, _ = write_cifar10(str(tmp_path), rows_per_batch=4)
    np.savez(tmp_path / "cifar10-cscores-orig-order.npz", labels=(labels + 1) % 10, scores=np.zeros(20))
    with pytest.raises(ValueError, match="disagree"):
        _main("cscores")(["--scale", "paper", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"), *FAST,
                          "--set", "task_args.n_train=10", "--set", "task_args.n_heldout=10"])


@pytest.mark.slow      # a ResNet18 and its NTK on the CPU: minutes on 2 shared cores
def test_labelnoise_paper_config_end_to_end(tmp_path):
    _, labels, _, _ = write_cifar10(str(tmp_path), rows_per_batch=4)
    out = tmp_path / "run"
    args = ["--scale", "paper", "--data-dir", str(tmp_path), "--out", str(out), *FAST, "--set", "steps=[2,2]",
            "--set", "task_args.n_train=14", "--set", "task_args.n_heldout=6", "--set", "batch_size=7",
            "--set", "probe_size=2"]
    assert _main("labelnoise")(args) == 0
    _check_run(out, [1.0, 100.0], ["clean", "noisy", "heldout"], "labelnoise.png")
    config = load_config(REPO / "experiments" / "labelnoise" / "config-paper.toml",
                         [f"--task_args.data_dir={json.dumps(str(tmp_path))}", "--task_args.n_train=14",
                          "--task_args.n_heldout=6"])
    from fasttangent.reproduce.labelnoise import task
    t = task(config)
    clean, noisy = t.groups["clean"], t.groups["noisy"]
    assert len(noisy) == round(0.15 * 14) and len(clean) + len(noisy) == 14
    original = torch.as_tensor(labels[:14])
    assert torch.equal(t.y[clean], original[clean]) and bool((t.y[noisy] != original[noisy]).all())


def _celeba_fixture(root, n=48):
    rng = np.random.default_rng(0)
    attributes = rng.integers(0, 2, (n, len(CELEBA_ATTRIBUTES)))
    blond, male = CELEBA_ATTRIBUTES.index("Blond_Hair"), CELEBA_ATTRIBUTES.index("Male")
    attributes[:, blond] = np.arange(n) % 2                 # every (blond, male) group in every split
    attributes[:, male] = (np.arange(n) // 2) % 2
    partition = np.where(np.arange(n) < 24, 0, np.where(np.arange(n) < 32, 1, 2))
    write_celeba(str(root), attributes, partition)


@pytest.mark.slow      # a ResNet18 and its NTK on the CPU: minutes on 2 shared cores
def test_celeba_paper_config_end_to_end(tmp_path):
    _celeba_fixture(tmp_path)
    out = tmp_path / "run"
    args = ["--scale", "paper", "--data-dir", str(tmp_path), "--out", str(out), *FAST, "--set", "steps=[2,2,2]",
            "--set", "task_args.n_train=20", "--set", "task_args.per_group=3", "--set", "task_args.probe_per_group=1",
            "--set", "task_args.image_size=32", "--set", "batch_size=5"]
    assert _main("celeba")(args) == 0
    groups = ["train", "train_with", "train_without", "test", "test_with", "test_without"]
    _check_run(out, [0.5, 1.0, 100.0], groups, "spurious.png")


@pytest.mark.slow      # a ResNet18 and its NTK on the CPU: minutes on 2 shared cores
def test_waterbirds_paper_config_end_to_end(tmp_path):
    from torchvision.models import resnet18
    n = 32
    y, place = np.arange(n) % 2, (np.arange(n) // 2) % 2
    split = np.where(np.arange(n) < 20, 0, np.where(np.arange(n) < 24, 1, 2))
    write_waterbirds(str(tmp_path), y, split, place)
    out = tmp_path / "run"
    args = ["--scale", "paper", "--data-dir", str(tmp_path), "--out", str(out), *FAST, "--set", "steps=[2,2,2]",
            "--set", "task_args.per_group=2", "--set", "task_args.probe_per_group=1",
            "--set", "task_args.image_size=32", "--set", "batch_size=5"]
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth"):
        _main("waterbirds")(args)
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18-f37072fd.pth")
    assert _main("waterbirds")(args) == 0
    groups = ["train", "train_with", "train_without", "test", "test_with", "test_without"]
    _check_run(out, [0.5, 1.0, 100.0], groups, "spurious.png")


# ----------------------------------------------------------------------------- CPU scale, real data


needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                                   reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}")


@needs_fashion
@pytest.mark.parametrize("exp_id", EXPERIMENTS)
def test_cpu_configs_run_on_real_fashion_mnist(exp_id, tmp_path):
    out = tmp_path / exp_id
    tiny = {"cscores": ["task_args.n_train=100", "task_args.n_heldout=50",
                        "task_args.cscore_options={models_per_ratio=2, steps=3}", "steps=[2,2]"],
            "labelnoise": ["task_args.n_train=100", "task_args.n_heldout=50", "steps=[2,2]"],
            "celeba": ["task_args.n_train=100", "task_args.n_test=200", "task_args.per_group=10",
                       "task_args.probe_per_group=2", "steps=[2,2,2]"],
            "waterbirds": ["task_args.n_train=100", "task_args.n_test=200", "task_args.per_group=10",
                           "task_args.probe_per_group=2", "task_args.pretrain_n=100",
                           "task_args.pretrain_epochs=1", "steps=[2,2,2]"]}[exp_id]
    args = ["--scale", "cpu", "--out", str(out), *FAST, "--set", "probe_size=4"]
    for item in tiny:
        args += ["--set", item]
    assert _main(exp_id)(args) == 0
    rows = _rows(out)
    assert {r["alpha"] for r in rows} == set(load_config(REPO / "experiments" / exp_id / "config-cpu.toml").alphas)
    assert all(len(r["metrics"]) == 3 for r in rows)
    if exp_id == "waterbirds":
        assert (out / "pretrained_small_cnn.pt").exists()


@needs_fashion
def test_spurious_stand_in_groups(tmp_path):
    config = load_config(REPO / "experiments" / "celeba" / "config-cpu.toml",
                         ["--task_args.n_train=400", "--task_args.n_test=400", "--task_args.per_group=20",
                          "--task_args.probe_per_group=5", f"--out={json.dumps(str(tmp_path))}"])
    t = common.spurious_task(config)
    from fasttangent.data import fashion_mnist_spurious_task
    train, test = fashion_mnist_spurious_task(positive_classes=[0, 2], negative_classes=[3, 4, 6], n_train=400,
                                              n_test=400, seed=0)
    assert torch.equal(t.y, train.y.float())
    with_idx, without_idx = t.groups["train_with"], t.groups["train_without"]
    # the planted feature agrees with the label in 95% of training images: "with" means a == y
    assert bool((train.attribute[with_idx] == train.y[with_idx]).all())
    assert bool((train.attribute[without_idx] != train.y[without_idx]).all())
    # 20 per group; both minority groups (5% of each class) are smaller than 20 and taken whole
    assert len(with_idx) == 40 and len(without_idx) == int((train.attribute != train.y).sum())
    assert len(t.groups["test_with"][1]) == len(t.groups["test_without"][1]) == 40
    assert len(t.probe_x) == 20


# ----------------------------------------------------------------------------- helpers



def test_on_grid_interpolates_and_masks_outside_range():
    x = np.array([3.0, 1.0, 2.0])
    y = np.array([30.0, 10.0, 20.0])
    grid = np.array([0.5, 1.5, 2.5, 3.5])
    values = common.on_grid(x, y, grid)
    assert np.isnan(values[0]) and np.isnan(values[3])
    assert values[1:3].tolist() == [15.0, 25.0]
    assert common.shared_grid([np.array([0.0, 2.0]), np.array([1.0, 3.0])], num=3).tolist() == [1.0, 1.5, 2.0]
