"""Shared machinery of the image reproductions (cscores, labelnoise, celeba, waterbirds).

An experiment is a ``fasttangent train`` config (TOML: ``TrainConfig`` keys, the task function
in ``task``, the experiment's data and model settings in ``[task_args]``) plus a figure
function. ``fasttangent reproduce <id> --scale paper|cpu`` reads
``experiments/<id>/config-<scale>.toml``, applies ``--data-dir``/``--out``/``--set`` overrides,
trains every α through :func:`fasttangent.train.train` (same θ0, same minibatches) and
draws the figures from the run's ``log.jsonl``; ``fasttangent train CONFIG.toml`` runs the
same config without the figures.

Progress is compared at equal training loss, as in the paper: curves are drawn against a
loss measured in eval mode on the training set (the mean training loss, or the clean-example
loss), and the numbers of ``summary.json`` interpolate both regimes onto a shared grid of it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..train import Task, TrainConfig, load_config, read_log, train

REPO_ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- command line


def default_config_path(exp_id: str, scale: str) -> Path:
    """``experiments/<id>/config-<scale>.toml`` of the source checkout (or of the current directory)."""
    for base in (REPO_ROOT, Path.cwd()):
        path = base / "experiments" / exp_id / f"config-{scale}.toml"
        if path.exists():
            return path
    raise FileNotFoundError(f"no experiments/{exp_id}/config-{scale}.toml next to the package or in {Path.cwd()}; "
                            "pass --config PATH")


def parse_args(exp_id: str, description: str, argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"fasttangent reproduce {exp_id}", description=description)
    parser.add_argument("--scale", choices=("paper", "cpu"), default="cpu",
                        help="paper: the paper's data and network (GPU, user-supplied data); cpu: real offline "
                             "data, small CNN, ~10 minutes on 2 cores (default)")
    parser.add_argument("--config", default=None,
                        help=f"TOML config (default experiments/{exp_id}/config-SCALE.toml)")
    parser.add_argument("--out", default=None, help=f"run directory (default runs/{exp_id}-SCALE)")
    parser.add_argument("--data-dir", default=None, help="dataset root (sets task_args.data_dir)")
    parser.add_argument("--figures", default=None, help="folder of the PNG figures (default: the run directory)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, TOML syntax, e.g. --set steps=[100,500] "
                             "--set task_args.n_train=1000 (repeatable)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figures of an existing run")
    return parser.parse_args(argv)


def config_from_args(exp_id: str, args: argparse.Namespace) -> TrainConfig:
    path = Path(args.config) if args.config else default_config_path(exp_id, args.scale)
    overrides = [f"--{item}" for item in args.set]
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not of the form KEY=VALUE")
    if args.data_dir is not None:
        overrides.append(f"--task_args.data_dir={json.dumps(str(args.data_dir))}")
    overrides.append(f"--out={json.dumps(args.out or f'runs/{exp_id}-{args.scale}')}")
    return load_config(path, overrides)


def run(exp_id: str, description: str, argv, figures: Callable[[list, TrainConfig, Path], dict]) -> int:
    """Train (unless ``--plot-only``), draw the figures, write ``summary.json``; print where."""
    args = parse_args(exp_id, description, argv)
    config = config_from_args(exp_id, args)
    if args.plot_only:
        rows = read_log(config.out)
    else:
        from ..train import load_task
        rows = train(config, load_task(config))
    figure_dir = Path(args.figures or config.out)
    figure_dir.mkdir(parents=True, exist_ok=True)
    summary = figures(rows, config, figure_dir)
    (Path(config.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"log: {Path(config.out) / 'log.jsonl'}; summary: {Path(config.out) / 'summary.json'}; "
          f"figures in {figure_dir}")
    return 0


# ----------------------------------------------------------------------------- data helpers


def task_arg(config: TrainConfig, name: str, default=None, *, required: bool = False):
    args = config.task_args
    if required and (name not in args or args[name] in ("", None)):
        raise ValueError(f"config task_args.{name} is required for task {config.task!r}; set it in the TOML "
                         f"file or with --set task_args.{name}=VALUE")
    return args.get(name, default)


def data_dir(config: TrainConfig) -> str:
    """``task_args.data_dir``, which the paper-scale experiments need (user-supplied data)."""
    path = task_arg(config, "data_dir", "")
    if not path:
        raise ValueError(f"this experiment needs its dataset: pass --data-dir DIR (task_args.data_dir) "
                         f"for task {config.task!r}")
    return os.path.expanduser(path)


def cached_tensor(path: Path, signature: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, saved at ``path`` with ``signature`` and reused while it is unchanged."""
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("signature") == signature:
            return saved["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"signature": signature, "value": value}, path)
    return value


def pooled(config: TrainConfig, x: torch.Tensor) -> torch.Tensor:
    """Images average-pooled by ``task_args.pool`` (CPU scale: 28×28 -> 14×14 quarters the cost)."""
    factor = task_arg(config, "pool", 1)
    return torch.nn.functional.avg_pool2d(x, factor) if factor > 1 else x


# ----------------------------------------------------------------------------- models


def model_factory(config: TrainConfig, *, in_channels: int, num_outputs: int) -> Callable:
    """The network named by ``task_args.model`` (see ``fasttangent.models``)."""
    from .. import models

    name = task_arg(config, "model", required=True)
    if name == "cifar_resnet18":
        stem = task_arg(config, "stem", "cifar")
        return lambda: models.cifar_resnet18(num_outputs, stem=stem)
    if name == "resnet18_no_norm":
        return lambda: models.resnet18_no_norm(num_outputs)
    if name == "pretrained_resnet18":
        weights = task_arg(config, "pretrained_weights", "") or os.path.join(data_dir(config), "resnet18-f37072fd.pth")
        models.pretrained_resnet18(weights, num_outputs)      # fail now, with the path, if the file is missing
        return lambda: models.pretrained_resnet18(weights, num_outputs)
    if name == "small_cnn":
        width, hidden = task_arg(config, "width", 16), task_arg(config, "hidden", 64)
        return lambda: models.small_cnn(in_channels, num_outputs, width=width, hidden=hidden)
    if name == "pretrained_small_cnn":
        weights = small_cnn_weights(config, in_channels)
        return lambda: models.load_pretrained_small_cnn(weights, num_outputs)
    raise ValueError(f"task_args.model = {name!r}; choose cifar_resnet18, resnet18_no_norm, pretrained_resnet18, "
                     "small_cnn or pretrained_small_cnn")


def small_cnn_weights(config: TrainConfig, in_channels: int) -> str:
    """Path of the pretrained small CNN of the Waterbirds stand-in, pretraining it if absent:
    a ``pretrain_classes``-way Fashion-MNIST classifier, classes disjoint from the task's."""
    from .. import models
    from ..data import load_fashion_mnist

    path = task_arg(config, "pretrained_weights", "") or str(Path(config.out) / "pretrained_small_cnn.pt")
    if os.path.isfile(path):
        return path
    classes = torch.tensor(task_arg(config, "pretrain_classes", [1, 5, 7, 8, 9]))
    used = set(task_arg(config, "positive_classes", [])) | set(task_arg(config, "negative_classes", []))
    if used & set(classes.tolist()):
        raise ValueError(f"pretrain_classes {classes.tolist()} overlap the task's classes {sorted(used)}; "
                         "pretraining must be on a different task")
    data = load_fashion_mnist(task_arg(config, "data_dir", "") or _fashion_dir(), "train")
    keep = torch.isin(data.y, classes)
    x, y = pooled(config, data.x[keep]), torch.searchsorted(classes.sort().values, data.y[keep])
    n = task_arg(config, "pretrain_n", 6000)
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed + 7))[:n]
    result = models.pretrain_small_cnn(x[pick], y[pick], path, num_classes=len(classes),
                                       width=task_arg(config, "width", 16), hidden=task_arg(config, "hidden", 64),
                                       epochs=task_arg(config, "pretrain_epochs", 3), seed=config.seed + 7)
    print(f"pretrained small CNN on Fashion-MNIST classes {classes.tolist()}: "
          f"train accuracy {result['train_accuracy']:.3f}, saved to {path}")
    return path


def _fashion_dir() -> str:
    from ..data import FASHION_MNIST_DIR
    return FASHION_MNIST_DIR


# ----------------------------------------------------------------------------- spurious-correlation task


def spurious_task(config: TrainConfig) -> Task:
    """Binary task with a spurious attribute: CelebA, Waterbirds or a planted-feature stand-in.

    Groups (each row logs loss and accuracy): "train" (every training example),
    "train_with"/"train_without" (a balanced training subset of ``per_group`` per (y, a) group,
    split by whether the attribute agrees with the label as it mostly does in training) and
    "test", "test_with", "test_without" (the same on a balanced held-out set). The probe is
    ``probe_per_group`` examples of each group of the balanced held-out set (1 output).
    """
    from .. import data as D

    dataset = task_arg(config, "dataset", required=True)
    per_group = task_arg(config, "per_group", 180)
    seed = task_arg(config, "data_seed", 0)
    if dataset == "celeba":
        root = data_dir(config)
        size = task_arg(config, "image_size", 64)
        train_set = D.load_celeba(root, "train", n_images=task_arg(config, "n_train", 20000), image_size=size)
        test_set = D.load_celeba(root, "test", per_group=per_group, group_seed=seed, image_size=size)
    elif dataset == "waterbirds":
        root = data_dir(config)
        size = task_arg(config, "image_size", 224)
        train_set = D.load_waterbirds(root, "train", n_images=task_arg(config, "n_train", 0) or None,
                                     image_size=size)
        test_set = D.load_waterbirds(root, "test", per_group=per_group, group_seed=seed, image_size=size)
    elif dataset in ("fashion_mnist_spurious", "digits_spurious"):
        kwargs = dict(positive_classes=task_arg(config, "positive_classes", required=True),
                      negative_classes=task_arg(config, "negative_classes", None),
                      train_agreement=task_arg(config, "train_agreement", 0.95),
                      test_agreement=task_arg(config, "test_agreement", 0.5),
                      n_train=task_arg(config, "n_train", 0) or None, n_test=task_arg(config, "n_test", 0) or None,
                      feature=task_arg(config, "feature", "patch"), seed=seed)
        if dataset == "fashion_mnist_spurious":
            train_set, full_test = D.fashion_mnist_spurious_task(task_arg(config, "data_dir", "") or _fashion_dir(),
                                                                 **kwargs)
        else:
            train_set, full_test = D.digits_spurious_task(**kwargs)
        pick = D.balanced_group_indices(full_test.y, full_test.attribute, per_group, seed=seed).indices
        test_set = D.AttributeLabeled(*(t[pick] for t in full_test))
        train_set = train_set._replace(x=pooled(config, train_set.x))
        test_set = test_set._replace(x=pooled(config, test_set.x))
    else:
        raise ValueError(f"task_args.dataset = {dataset!r}; choose celeba, waterbirds, fashion_mnist_spurious "
                         "or digits_spurious")

    y_train, a_train = train_set.y, train_set.attribute
    balanced = D.balanced_group_indices(y_train, a_train, per_group, seed=seed).indices
    with_train = D.spurious_aligned(y_train[balanced], a_train[balanced], reference_y=y_train, reference_attribute=a_train)
    with_test = D.spurious_aligned(test_set.y, test_set.attribute, reference_y=y_train, reference_attribute=a_train)
    target = lambda y: y.float()                                     # logistic loss: {0, 1} float labels
    groups = {
        "train": torch.arange(len(y_train)),
        "train_with": balanced[with_train],
        "train_without": balanced[~with_train],
        "test": (test_set.x, target(test_set.y)),
        "test_with": (test_set.x[with_test], target(test_set.y[with_test])),
        "test_without": (test_set.x[~with_test], target(test_set.y[~with_test])),
    }
    probe_pick = D.balanced_group_indices(test_set.y, test_set.attribute, task_arg(config, "probe_per_group", 150),
                                          seed=seed + 1).indices
    return Task(x=train_set.x, y=target(y_train), groups=groups, probe_x=test_set.x[probe_pick],
                model_factory=model_factory(config, in_channels=train_set.x.shape[1], num_outputs=1))


# ----------------------------------------------------------------------------- plotting helpers


def by_alpha(rows: list) -> dict:
    """{α: rows of that α, in order}."""
    runs = {}
    for row in rows:
        runs.setdefault(row["alpha"], []).append(row)
    return dict(sorted(runs.items()))


def group_value(run: list, group: str, key: str = "loss") -> np.ndarray:
    return np.array([r["groups"].get(group, {}).get(key, np.nan) for r in run], dtype=float)


def metric_value(run: list, metric: str) -> np.ndarray:
    return np.array([r["metrics"].get(metric, np.nan) for r in run], dtype=float)


def on_grid(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """y(x) linearly interpolated at ``grid`` (x sorted first; NaN outside x's range)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return np.full(len(grid), np.nan)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    values = np.interp(grid, x, y)
    values[(grid < x[0]) | (grid > x[-1])] = np.nan
    return values


def shared_grid(xs: list, num: int = 50) -> np.ndarray:
    """``num`` points spanning the range of progress that every run covers."""
    low = max(np.nanmin(x) for x in xs)
    high = min(np.nanmax(x) for x in xs)
    if not low < high:
        return np.array([])
    return np.linspace(low, high, num)


def nanmean(values) -> float | None:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def regime_label(alpha: float) -> str:
    if alpha < 1:
        return f"super adaptive (α={alpha:g})"
    if alpha == 1:
        return f"non-linear (α={alpha:g})"
    return f"linear (α={alpha:g})"


LINESTYLES = {0.5: ":", 1.0: "-"}


def linestyle(alpha: float) -> str:
    return LINESTYLES.get(alpha, "--")


METRIC_NAMES = {"sign_similarity": "sign similarity", "repr_alignment": "repr. alignment",
                "ntk_alignment": "ntk alignment"}


def plot_metrics(ax, runs: dict, progress: Callable[[list], np.ndarray], xlabel: str) -> None:
    """The three linearity metrics vs a progress measure; colour = metric, style = regime."""
    colors = {"sign_similarity": "tab:blue", "repr_alignment": "tab:orange", "ntk_alignment": "tab:green"}
    for alpha, run in runs.items():
        x = progress(run)
        for metric, color in colors.items():
            y = metric_value(run, metric)
            if np.isfinite(y).any():
                ax.plot(x, y, linestyle(alpha), color=color,
                        label=f"{METRIC_NAMES[metric]}, {regime_label(alpha)}")
    ax.set(xlabel=xlabel, ylabel="linearity metrics")
    ax.legend(fontsize=6)


def metrics_summary(runs: dict) -> dict:
    """Last value of each linearity metric per α (the α=100 run should stay near 1)."""
    return {f"{alpha:g}": {m: float(metric_value(run, m)[-1]) for m in METRIC_NAMES
                           if np.isfinite(metric_value(run, m)[-1])} for alpha, run in runs.items()}


def save_figure(fig, path: Path) -> str:
    """PNG at a resolution that keeps it small (well under 300 KB for these line plots)."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return str(path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def spurious_figures(rows: list, config: TrainConfig, out: Path, title: str) -> dict:
    """Fig. 3 row: test vs train accuracy; accuracy without vs with the spurious correlation
    (train, test); linearity metrics vs training accuracy. Returns the summary numbers.

    Summary: the mean "without spurious" accuracy of each α over a shared grid of "with
    spurious" accuracy (the range every α covers), train and test; the mean test accuracy
    of each α over a shared grid of training accuracy; the final accuracies and metrics."""
    plt = pyplot()
    runs = by_alpha(rows)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for alpha, run in runs.items():
        style = dict(linestyle=linestyle(alpha), marker=".", markersize=3, label=regime_label(alpha))
        axes[0].plot(group_value(run, "train", "acc"), group_value(run, "test", "acc"), **style)
        axes[1].plot(group_value(run, "train_with", "acc"), group_value(run, "train_without", "acc"), **style)
        axes[2].plot(group_value(run, "test_with", "acc"), group_value(run, "test_without", "acc"), **style)
    axes[0].set(xlabel="accuracy train", ylabel="accuracy test (balanced)", title=title)
    axes[1].set(xlabel="train acc. ex. with spurious correl.", ylabel="train acc. ex. w/o spurious correl.")
    axes[2].set(xlabel="test acc. ex. with spurious correl.", ylabel="test acc. ex. w/o spurious correl.")
    for ax in axes[:3]:
        ax.legend(fontsize=7)
    plot_metrics(axes[3], runs, lambda run: group_value(run, "train", "acc"), "accuracy train")
    paths = [save_figure(fig, out / "spurious.png")]

    summary = {"figures": paths, "final_metrics": metrics_summary(runs), "without_spurious_at_equal_with": {},
               "test_acc_at_equal_train_acc": {}, "final": {}}
    for split in ("train", "test"):
        xs = {a: group_value(r, f"{split}_with", "acc") for a, r in runs.items()}
        grid = shared_grid(list(xs.values()))
        summary["without_spurious_at_equal_with"][split] = {
            f"{a:g}": nanmean(on_grid(xs[a], group_value(r, f"{split}_without", "acc"), grid)) for a, r in runs.items()}
    xs = {a: group_value(r, "train", "acc") for a, r in runs.items()}
    grid = shared_grid(list(xs.values()))
    summary["test_acc_at_equal_train_acc"] = {
        f"{a:g}": nanmean(on_grid(xs[a], group_value(r, "test", "acc"), grid)) for a, r in runs.items()}
    summary["final"] = {f"{a:g}": {"step": r[-1]["step"], "train_loss": r[-1]["train_loss"],
                                   **{g: r[-1]["groups"][g]["acc"] for g in r[-1]["groups"]}}
                        for a, r in runs.items()}
    return summary


# ----------------------------------------------------------------------------- 10-class data (Fig. 2)


def classification_data(config: TrainConfig) -> dict:
    """Training and held-out sets of the Fig. 2 experiments, as tensors.

    ``dataset = "cifar10"``: the first ``n_train`` CIFAR-10 training images (data_batch order)
    are trained on and the next ``n_heldout`` are held out, as in the authors' code (40 000 /
    10 000), so that held-out examples have published C-scores too.
    ``dataset = "fashion_mnist"``: a seeded sample of ``n_train + n_heldout`` Fashion-MNIST
    training images, split in the same way.
    Returns {"x", "y", "x_heldout", "y_heldout", "index", "index_heldout"} (index: rows in
    the source training set).
    """
    from .. import data as D

    dataset = task_arg(config, "dataset", required=True)
    n_train = task_arg(config, "n_train", required=True)
    n_heldout = task_arg(config, "n_heldout", 0)
    if dataset == "cifar10":
        source = D.load_cifar10(data_dir(config), "train", limit=n_train + n_heldout)
        rows = torch.arange(n_train + n_heldout)
    elif dataset == "fashion_mnist":
        seed = task_arg(config, "data_seed", 0)
        source = D.load_fashion_mnist(task_arg(config, "data_dir", "") or _fashion_dir(), "train")
        rows = torch.sort(torch.randperm(len(source.y), generator=torch.Generator().manual_seed(seed))
                          [:n_train + n_heldout]).values
        shuffle = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 1))
        rows = rows[shuffle]                  # the held-out part is a uniform sample too
        source = D.Labeled(source.x[rows], source.y[rows])
    else:
        raise ValueError(f"task_args.dataset = {dataset!r}; choose cifar10 or fashion_mnist")
    source = D.Labeled(pooled(config, source.x), source.y)
    if len(source.y) < n_train + n_heldout:
        raise ValueError(f"{dataset} has {len(source.y)} training images, fewer than n_train + n_heldout = "
                         f"{n_train + n_heldout}; lower them")
    return {"x": source.x[:n_train], "y": source.y[:n_train], "x_heldout": source.x[n_train:],
            "y_heldout": source.y[n_train:], "index": rows[:n_train], "index_heldout": rows[n_train:]}


def classifier_task(config: TrainConfig, data: dict, labels: torch.Tensor, groups: dict) -> Task:
    """A 10-class ``Task`` on ``data`` with training ``labels`` and ``groups``; probe:
    ``probe_size`` training inputs (the driver's default, seeded)."""
    return Task(x=data["x"], y=labels, groups=groups,
                model_factory=model_factory(config, in_channels=data["x"].shape[1],
                                            num_outputs=task_arg(config, "num_classes", 10)))
