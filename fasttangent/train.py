"""The α-scaled training driver: one loop, several α, same start, same minibatches.

Every α in ``config.alphas`` trains ``AlphaScaled(model, α)`` from the *same* initial
parameters θ0 with learning rate ``lr / α²`` on the *same* sequence of minibatches (the
paper's fork protocol), one α after the other. Along training the driver logs, one JSON
line per row, the training loss, loss and accuracy on named example groups, and the three
linearity metrics of ``fasttangent.LinearityProbe`` measured on f_θ (not f^α) against θ0.

Python use (the image experiments plug in here)::

    from fasttangent.train import Task, TrainConfig, train
    task = Task(x=x_train, y=y_train,                      # (n, ...) inputs, (n,) labels
                model_factory=lambda: remove_batchnorm(resnet18(num_classes=10)),
                groups={"decile0": idx0,                    # index tensor into the training set
                        "test": (x_test, y_test)},          # or held-out (x, y) tensors
                transform=normalize,                        # optional, every batch (uint8 -> float)
                augment=None)                               # optional, random, training batches only
    cfg = TrainConfig(out="runs/cscores", alphas=[1, 100], lr=0.01, momentum=0.9,
                      batch_size=125, steps=[64000, 320000])
    rows = train(cfg, task)                                 # also written to runs/cscores/log.jsonl

Command line: ``fasttangent train CONFIG.toml [--key=value ...]``; the TOML file holds
``TrainConfig`` fields (``task = "module:function"`` names a function ``f(config) -> Task``,
given ``config.task_args``), overrides are TOML values: ``--lr=0.01 --alphas=[1,100]
--task_args.n=200``. ``fasttangent plot RUN_DIR`` draws a run's log.

Task interface (``Task``):

- ``x`` (n, ...) and ``y`` (n,): training set. Labels are class indices (int64) for
  cross-entropy with c outputs, or {0, 1} floats for the logistic loss with 1 output
  (``loss="auto"`` picks by the model's output width). Tensors are moved to the device;
  floating ``x`` is cast to ``config.dtype``, other dtypes (uint8 images) are left for
  ``transform``.
- ``model_factory()``: a new network, called once under ``torch.manual_seed(config.seed)``;
  remove or freeze BatchNorm there (``fasttangent.alpha``). Its output is (n, c); (n,)
  is accepted for c = 1.
- ``groups``: name -> index tensor (int64, into the training set), bool mask over the
  training set, or (x, y) held-out tensors; an empty group is an error.
  Each log row holds {"loss", "acc"} per group, in eval mode.
- ``probe_x``: inputs of the linearity probe; default ``config.probe_size`` training inputs
  drawn with ``config.seed``.
- ``transform(x)``: deterministic, applied to every batch (training, groups, probe).
- ``augment(x, generator)``: random, training batches only, after ``transform``; the driver
  passes its own ``torch.Generator`` (saved in checkpoints). With augmentation f_θ0(x) is
  recomputed per batch; without it, f_θ0 of every training and group example is computed
  once and a step costs one forward and one backward, as for the bare network.

Training loss and log schedule. The objective is the per-example loss ℓ averaged over the
batch (``loss_reduction="mean"``) or summed (``"sum"``, the paper's eq. 1 for full-batch
GD). The *reported* training loss is per example: for full-batch GD the exact loss at the
current parameters, for SGD an exponential moving average of minibatch losses with a time
constant of one epoch. A row is logged at step 0, at the last step and, with
``log_schedule="loss"`` (the authors' rule), each time the training loss falls below
L0·decay^k for the next k, L0 = log(c) (log 2 for the logistic loss), decay 0.96; with
``"every"``, each ``log_every`` steps. A row (the metrics are those of the parameters
*before* the step's update, at which the loss was computed)::

    {"alpha": 100.0, "step": 120, "epoch": 0.3, "train_loss": 0.41,
     "groups": {"test": {"loss": 0.52, "acc": 0.81}, ...},
     "metrics": {"sign_similarity": 0.99, "ntk_alignment": 0.98, "repr_alignment": 0.99},
     "seconds": 3.2}

Checkpoints and exact resume. ``out/checkpoint.pt`` is written every ``checkpoint_every``
steps and when an α finishes; it holds the model (θ and θ0), optimizer, minibatch sampler
(generator state, permutation, position), the augmentation generator, the global RNG states,
the loss average and the log schedule position, and how many log lines belong to it. A run
restarted with the same config (``resume=true``, the default) truncates ``log.jsonl`` to
those lines and continues; on the CPU it logs exactly the numbers of an uninterrupted run
(``seconds`` aside). ``stop_after`` ends an invocation after that many steps without a
checkpoint, as a kill would.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import random
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .alpha import AlphaScaled, alpha_lr


# ---------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Everything a run depends on, as plain data (TOML keys of the same names)."""

    task: str = ""                    # "module:function" returning a Task (command line only)
    task_args: dict = field(default_factory=dict)   # keywords for the task function
    out: str = "runs/train"           # run directory: config.json, log.jsonl, init.pt, checkpoint.pt
    alphas: list = field(default_factory=lambda: [1.0, 100.0])
    center: bool = False              # f^α = α (f_θ − f_θ0) instead of f_θ0 + α (f_θ − f_θ0)
    lr: float = 0.01                  # η; α trains with η / α²
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 0               # 0 (or ≥ n): full-batch gradient descent
    steps: list = field(default_factory=lambda: [1000])  # optimizer steps: one value, or one per α
    stop_loss: float = 0.0            # an α's run also ends once its training loss is below this
    loss: str = "auto"                # "logistic" (1 output, BCE) | "cross_entropy" | "auto"
    loss_reduction: str = "mean"      # objective over a batch: "mean" | "sum"
    seed: int = 0                     # initial parameters, probe set, minibatch order
    log_schedule: str = "loss"        # "loss": at L0·decay^k crossings | "every": each log_every steps
    log_decay: float = 0.96
    log_every: int = 100
    probe: bool = True                # measure the linearity metrics in every row
    probe_size: int = 100
    probe_outputs: str = "trace"      # "trace" | "full" NTK Gram (see fasttangent.ntk_gram)
    probe_backend: str = "auto"
    eval_batch_size: int = 1024
    checkpoint_every: int = 1000      # steps; 0: only when an α finishes
    stop_after: int = 0               # end this invocation after that many steps, as if killed
    resume: bool = True               # continue from out/checkpoint.pt when it exists
    device: str = "auto"              # "auto" (cuda when available) | "cpu" | "cuda" | "cuda:1" ...
    dtype: str = "float32"
    progress: bool = True             # tqdm progress bar

    # fields that may change between an interrupted run and its resumption
    RESUMABLE_CHANGES = ("stop_after", "resume", "progress", "device", "eval_batch_size", "out")

    def steps_for(self, k: int) -> int:
        """Number of optimizer steps of the k-th α."""
        if len(self.steps) == 1:
            return int(self.steps[0])
        return int(self.steps[k])

    def validate(self) -> "TrainConfig":
        if not self.alphas or any(a <= 0 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty list of positive numbers, got {self.alphas}")
        if len(self.steps) not in (1, len(self.alphas)):
            raise ValueError(f"steps has {len(self.steps)} values for {len(self.alphas)} alphas; give one value "
                             "or one per alpha")
        choices = {"loss": ("auto", "logistic", "cross_entropy"), "loss_reduction": ("mean", "sum"),
                   "log_schedule": ("loss", "every"), "probe_outputs": ("trace", "full")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}; choose one of {allowed}")
        if not 0 < self.log_decay < 1:
            raise ValueError(f"log_decay must be in (0, 1), got {self.log_decay}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype {self.dtype!r} is not a torch dtype name; use e.g. 'float32' or 'float64'")
        return self


def _coerce(name: str, value, default):
    """Check/convert a config value against its default's type (TOML ints → floats, etc.)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"config field {name!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list):
        value = value if isinstance(value, list) else [value]
        kind = float if name == "alphas" else int if name == "steps" else None
        return [kind(v) for v in value] if kind else value
    if isinstance(default, dict) and not isinstance(value, dict):
        raise TypeError(f"config field {name!r} must be a table, got {value!r}")
    if type(value) is not type(default) and not isinstance(default, (dict, list)):
        raise TypeError(f"config field {name!r} must be a {type(default).__name__}, got {value!r}")
    return value


def _parse_value(text: str):
    """A command-line value as TOML (``100``, ``[1, 100]``, ``true``, ``"x"``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def make_config(values: dict) -> TrainConfig:
    """A validated ``TrainConfig`` from a dict (TOML table); unknown keys are errors."""
    defaults = TrainConfig()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise KeyError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
    return TrainConfig(**{k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items()}).validate()


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML config file (or start from defaults) and apply ``--key=value`` overrides;
    dotted keys reach into tables (``--task_args.n=200``)."""
    values = {}
    if path is not None:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"override {item!r} is not of the form --key=value")
        key, text = item[2:].split("=", 1)
        *tables, leaf = key.replace("-", "_").split(".")
        target = values
        for t in tables:
            target = target.setdefault(t, {})
        target[leaf] = _parse_value(text)
    return make_config(values)


# ---------------------------------------------------------------------------------------
# task


@dataclass
class Task:
    """Data and network of a run (see the module docstring for each field)."""

    x: torch.Tensor
    y: torch.Tensor
    model_factory: Callable[[], nn.Module]
    groups: dict = field(default_factory=dict)
    probe_x: torch.Tensor | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None


def load_task(config: TrainConfig) -> Task:
    """Build the task named by ``config.task`` ("package.module:function")."""
    if ":" not in config.task:
        raise ValueError(f"config.task = {config.task!r}; name a task function as 'module:function', "
                         "e.g. 'fasttangent.tasks.yinyang:task'")
    module_name, function_name = config.task.split(":", 1)
    return getattr(importlib.import_module(module_name), function_name)(config)


# ---------------------------------------------------------------------------------------
# pieces of the loop


class EpochSampler:
    """Minibatch indices: a fresh random permutation each epoch, from a private generator
    (so the order depends on ``seed`` only, identically for every α). Full batch when
    ``batch_size`` is 0 or ≥ n: always ``arange(n)``."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n = n
        self.batch_size = n if batch_size <= 0 or batch_size >= n else batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.permutation = None
        self.position = 0

    @property
    def full_batch(self) -> bool:
        return self.batch_size == self.n

    def next(self) -> torch.Tensor:
        if self.full_batch:
            return torch.arange(self.n)
        if self.permutation is None or self.position >= self.n:
            self.permutation = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        batch = self.permutation[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "permutation": self.permutation, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.permutation, self.position = state["permutation"], state["position"]


class LogSchedule:
    """When to log a row: at step 0 and, by training loss, each time it falls below
    ``start · decay^k`` for the next k (the threshold index then jumps past the current
    loss, so one large drop logs one row); or every ``every`` steps."""

    def __init__(self, mode: str, start: float, decay: float, every: int):
        self.mode, self.start, self.decay, self.every = mode, start, decay, every
        self.k = 0

    def threshold(self) -> float:
        return self.start * self.decay ** self.k

    def due(self, step: int, loss: float) -> bool:
        if self.mode == "every":
            return step % self.every == 0
        if step == 0:
            return True
        if not loss < self.threshold():
            return False
        if loss > 0:
            self.k = max(self.k + 1, math.floor(math.log(loss / self.start) / math.log(self.decay)) + 1)
        else:
            self.k += 1
        return True

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = state["k"]


def per_example_loss(output: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """ℓ(f(x_i), y_i), shape (n,): logistic (output (n,) or (n, 1), y in {0, 1}) or
    cross-entropy (output (n, c), y class indices)."""
    if kind == "logistic":
        return F.binary_cross_entropy_with_logits(output.reshape(-1), y.to(output.dtype), reduction="none")
    return F.cross_entropy(output, y, reduction="none")


def correct(output: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Boolean (n,): prediction equals label."""
    if kind == "logistic":
        return (output.reshape(-1) > 0) == (y > 0.5)
    return output.argmax(dim=1) == y


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Data:
    """The task's tensors on the device, the groups resolved, f_θ0 caches."""

    def __init__(self, task: Task, config: TrainConfig, device: torch.device):
        dtype = getattr(torch, config.dtype)
        self.transform = task.transform or (lambda x: x)
        self.augment = task.augment
        self.x = self._put(task.x, device, dtype)
        self.y = task.y.to(device)
        self.n = len(self.y)
        if len(self.x) != self.n:
            raise ValueError(f"task.x has {len(self.x)} examples but task.y has {self.n}")
        self.groups = {}
        for name, group in task.groups.items():
            if isinstance(group, torch.Tensor):
                self.groups[name] = ("train", self._indices(name, group).to(device))
            else:
                gx, gy = group
                if len(gx) == 0 or len(gx) != len(gy):
                    raise ValueError(f"held-out group {name!r} has {len(gx)} inputs and {len(gy)} targets; "
                                     "give it a non-empty (x, y) pair of equal lengths")
                self.groups[name] = ("heldout", (self._put(gx, device, dtype), gy.to(device)))
        if task.probe_x is not None:
            self.probe_x = self._put(task.probe_x, device, dtype)
        else:
            pick = torch.randperm(self.n, generator=torch.Generator().manual_seed(config.seed))[:config.probe_size]
            self.probe_x = self.x[pick.to(device)]
        self.probe_x = self.transform(self.probe_x)
        self.f0_train = None
        self.f0_heldout = {}

    def _indices(self, name: str, group: torch.Tensor) -> torch.Tensor:
        """A training-set group as int64 indices: an index tensor as is, a bool mask of the
        n training examples as the indices of its True entries."""
        if group.dtype == torch.bool:
            if group.shape != (self.n,):
                raise ValueError(f"group {name!r} is a bool mask of shape {tuple(group.shape)}; a mask must have "
                                 f"one entry per training example, shape ({self.n},)")
            group = group.nonzero().squeeze(1)
        elif group.is_floating_point() or group.is_complex() or group.dim() != 1:
            raise ValueError(f"group {name!r} must be a 1-d int64 index tensor or a bool mask over the training "
                             f"set, got dtype {group.dtype} and shape {tuple(group.shape)}")
        if group.numel() == 0:
            raise ValueError(f"group {name!r} is empty; drop it from task.groups or give it some examples")
        if group.min() < -self.n or group.max() >= self.n:
            raise ValueError(f"group {name!r} indexes outside the {self.n} training examples "
                             f"(indices from {int(group.min())} to {int(group.max())})")
        return group.to(torch.long)

    @staticmethod
    def _put(x, device, dtype):
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)

    def fill_f0(self, net: AlphaScaled, batch: int) -> None:
        """f_θ0 of every training and held-out group example (θ0 is shared by all α)."""
        def outputs(x):
            return torch.cat([net.initial_output(self.transform(x[i:i + batch])) for i in range(0, len(x), batch)])
        self.f0_train = outputs(self.x)
        for name, (kind, data) in self.groups.items():
            if kind == "heldout":
                self.f0_heldout[name] = outputs(data[0])


# ---------------------------------------------------------------------------------------
# the loop


def _evaluate(net: AlphaScaled, data: _Data, kind: str, batch: int) -> dict:
    """Per-group mean loss and accuracy of f^α, in eval mode, with cached f_θ0."""
    results = {}
    for name, (where, group) in data.groups.items():
        if where == "train":
            x, y, f0 = data.x[group], data.y[group], data.f0_train[group]
        else:
            (x, y), f0 = group, data.f0_heldout[name]
        loss_sum, hits = 0.0, 0
        for i in range(0, len(y), batch):
            out = net(data.transform(x[i:i + batch]), f0=f0[i:i + batch])
            loss_sum += per_example_loss(out, y[i:i + batch], kind).sum().item()
            hits += correct(out, y[i:i + batch], kind).sum().item()
        results[name] = {"loss": loss_sum / len(y), "acc": hits / len(y)}  # groups are non-empty
    return results


def _loss_kind(config: TrainConfig, net: AlphaScaled, data: _Data) -> tuple[str, int]:
    """("logistic" | "cross_entropy", number of classes c) from the config and output width."""
    with torch.no_grad():
        f0 = net.initial_output(data.transform(data.x[:2]))
        width = f0.reshape(f0.shape[0], -1).shape[1]  # an (n,) output is one output
    kind = config.loss if config.loss != "auto" else ("logistic" if width == 1 else "cross_entropy")
    if kind == "logistic" and width != 1:
        raise ValueError(f"the logistic loss needs 1 output, the model has {width}; use loss = 'cross_entropy'")
    return kind, (2 if kind == "logistic" else width)


def train(config: TrainConfig, task: Task, callback: Callable[[dict], None] | None = None) -> list[dict]:
    """Train every α of ``config`` on ``task``; return all log rows (also in ``out/log.jsonl``).

    ``callback(row)`` is called after each row is written (a test can raise there to
    simulate a crash; ``train`` then resumes from the last checkpoint when called again)."""
    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(config.device)
    data = _Data(task, config, device)
    log_path, ckpt_path, init_path = out / "log.jsonl", out / "checkpoint.pt", out / "init.pt"

    checkpoint = _open_checkpoint(config, out) if config.resume and ckpt_path.exists() else None
    if checkpoint is None:
        torch.manual_seed(config.seed)
        model = task.model_factory()
        _atomic_save(model.state_dict(), init_path)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
        log_path.write_text("")
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    if checkpoint is not None:
        rows = rows[:checkpoint["log_lines"]]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    init_state = torch.load(init_path, map_location="cpu", weights_only=True)

    steps_this_call = 0
    start_alpha = checkpoint["alpha_index"] if checkpoint else 0
    for k in range(start_alpha, len(config.alphas)):
        alpha = config.alphas[k]
        torch.manual_seed(config.seed)
        model = task.model_factory()
        model.load_state_dict(init_state)
        net = AlphaScaled(model.to(device=device, dtype=getattr(torch, config.dtype)), alpha, center=config.center)
        optimizer = torch.optim.SGD(net.parameters(), lr=alpha_lr(config.lr, alpha), momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        sampler = EpochSampler(data.n, config.batch_size, config.seed)
        augment_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
        net.eval()                                          # f_θ0 without dropout noise
        if data.f0_train is None:
            data.fill_f0(net, config.eval_batch_size)
        kind, classes = _loss_kind(config, net, data)
        schedule = LogSchedule(config.log_schedule, math.log(classes), config.log_decay, config.log_every)
        # the reference of the metrics is θ0 itself (also after a resume), on f_θ not f^α
        probe = _make_probe(net, data, config) if config.probe else None
        step, loss_average = 0, None
        if checkpoint is not None and checkpoint["alpha_index"] == k and "model" in checkpoint:
            net.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            sampler.load_state_dict(checkpoint["sampler"])
            schedule.load_state_dict(checkpoint["schedule"])
            augment_generator.set_state(checkpoint["augment_generator"])
            step, loss_average = checkpoint["step"], checkpoint["loss_average"]
            _set_rng_state(checkpoint["rng"])
        checkpoint = None
        total = config.steps_for(k)
        smoothing = 1.0 - sampler.batch_size / data.n      # EMA factor: time constant of one epoch
        started = time.perf_counter()
        bar = _progress(config, alpha, total, step)

        def save(next_alpha: int, state: bool):
            payload = {"alpha_index": next_alpha, "log_lines": len(rows), "config": dataclasses.asdict(config)}
            if state:
                payload.update(model=net.state_dict(), optimizer=optimizer.state_dict(), sampler=sampler.state_dict(),
                               schedule=schedule.state_dict(), augment_generator=augment_generator.get_state(),
                               step=step, loss_average=loss_average, rng=_rng_state())
            _atomic_save(payload, ckpt_path)

        while True:
            net.train()
            index = sampler.next()
            xb = data.transform(data.x[index.to(device)])
            if data.augment is not None:
                xb, f0 = data.augment(xb, augment_generator), None
            else:
                f0 = data.f0_train[index.to(device)]
            losses = per_example_loss(net(xb, f0=f0), data.y[index.to(device)], kind)
            batch_loss = losses.mean().item()
            loss_average = batch_loss if loss_average is None else smoothing * loss_average + (1 - smoothing) * batch_loss
            finished = step >= total or loss_average < config.stop_loss
            if schedule.due(step, loss_average) or finished:
                row = _row(net, data, kind, probe, config, alpha, step, sampler, loss_average, started)
                rows.append(row)
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{loss_average:.4f}", **{_SHORT_NAMES.get(m, m): f"{v:.3f}" for m, v in row["metrics"].items()})
                if callback is not None:
                    callback(row)
            if finished:
                break
            objective = losses.sum() if config.loss_reduction == "sum" else losses.mean()
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            step += 1
            steps_this_call += 1
            bar.update(1)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save(k, state=True)
            if config.stop_after and steps_this_call >= config.stop_after:
                bar.close()
                return rows
        bar.close()
        save(k + 1, state=False)
    return rows


def _open_checkpoint(config: TrainConfig, out: Path) -> dict:
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    saved, now = checkpoint["config"], dataclasses.asdict(config)
    changed = [k for k in now if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if changed:
        raise ValueError(f"{out} holds a run with a different config ({', '.join(changed)} changed); "
                         "use another --out, delete the directory, or pass --resume=false to start over")
    return checkpoint


_SHORT_NAMES = {"sign_similarity": "signs", "ntk_alignment": "ntk", "repr_alignment": "repr"}  # progress bar


def _make_probe(net: AlphaScaled, data: _Data, config: TrainConfig):
    from .metrics import LinearityProbe
    reference = net.initial_model().eval()
    return LinearityProbe(reference, data.probe_x, outputs=config.probe_outputs, backend=config.probe_backend)


def _row(net, data, kind, probe, config, alpha, step, sampler, loss_average, started) -> dict:
    net.eval()
    with torch.no_grad():
        groups = _evaluate(net, data, kind, config.eval_batch_size)
    # a metric with no value (e.g. every ReLU off) is logged as NaN rather than ending the run
    metrics = probe.measure(net.model, undefined="nan") if probe is not None else {}
    net.train()
    return {"alpha": alpha, "step": step, "epoch": step * sampler.batch_size / data.n, "train_loss": loss_average,
            "groups": groups, "metrics": {m: float(v) for m, v in metrics.items()},
            "seconds": time.perf_counter() - started}


class _NoBar:
    def update(self, n):
        return None

    def set_postfix(self, **kwargs):
        return None

    def close(self):
        return None


def _progress(config: TrainConfig, alpha: float, total: int, done: int):
    if not config.progress:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=done, desc=f"alpha={alpha:g}", dynamic_ncols=True, leave=True)


# ---------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    """``fasttangent train CONFIG.toml [--key=value ...]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        fields = "\n".join(f"  {f.name}" for f in dataclasses.fields(TrainConfig))
        print(f"usage: fasttangent train CONFIG.toml [--key=value ...]\n\nconfig keys:\n{fields}")
        return 0 if argv else 2
    config = load_config(argv[0], argv[1:])
    rows = train(config, load_task(config))
    print(f"{len(rows)} rows in {Path(config.out) / 'log.jsonl'}")
    return 0


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``RUN_DIR/log.jsonl``."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the 'out' directory of a 'fasttangent train' run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(rows: list[dict], path: str | os.PathLike) -> None:
    """Training loss vs step, group losses and linearity metrics vs training loss, per α."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["alpha"] for r in rows})
    groups = sorted({g for r in rows for g in r["groups"]})
    metrics = sorted({m for r in rows for m in r["metrics"]})
    panels = 1 + len(groups) + len(metrics)
    cols = min(panels, 4)
    rows_of_panels = -(-panels // cols)
    fig, grid = plt.subplots(rows_of_panels, cols, figsize=(3.4 * cols, 3 * rows_of_panels), squeeze=False)
    axes = grid.reshape(-1)
    for ax in axes[panels:]:
        ax.set_visible(False)
    axes = axes[:panels]
    for alpha in alphas:
        run = [r for r in rows if r["alpha"] == alpha]
        loss = [r["train_loss"] for r in run]
        axes[0].plot([max(r["step"], 1) for r in run], loss, marker=".", label=f"α={alpha:g}")
        for ax, g in zip(axes[1:], groups):
            ax.plot(loss, [r["groups"].get(g, {}).get("loss", np.nan) for r in run], marker=".", label=f"α={alpha:g}")
            ax.set_title(f"loss on {g}")
        for ax, m in zip(axes[1 + len(groups):], metrics):
            ax.plot(loss, [r["metrics"].get(m, np.nan) for r in run], marker=".", label=f"α={alpha:g}")
            ax.set_title(m)
    axes[0].set(xscale="log", xlabel="step", ylabel="training loss", title="training loss")
    for ax in axes[1:]:
        ax.set_xlabel("training loss")
        ax.invert_xaxis()                               # progress goes left to right
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_main(argv: list[str] | None = None) -> int:
    """``fasttangent plot RUN_DIR [--out FILE]``: draw a run's log (default RUN_DIR/training.png)."""
    import argparse
    parser = argparse.ArgumentParser(prog="fasttangent plot", description=plot_main.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="image file (default RUN_DIR/training.png)")
    args = parser.parse_args(argv)
    path = args.out or str(Path(args.run_dir) / "training.png")
    plot_run(read_log(args.run_dir), path)
    print(path)
    return 0
