"""The training driver: against a hand-written loop, exact resume, config, schedule, CLI."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from fasttangent.train import (EpochSampler, LogSchedule, Task, TrainConfig, load_config, main, plot_main,
                               read_log, train)


def _task(classes=1, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = (x[:, 0] > 0).float() if classes == 1 else torch.randint(0, classes, (n,), generator=g)
    x_test = torch.randn(10, 3, generator=g)
    y_test = (x_test[:, 0] > 0).float() if classes == 1 else torch.randint(0, classes, (10,), generator=g)
    return Task(x=x, y=y,
                model_factory=lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                                    nn.Linear(8, classes)),
                groups={"train": torch.arange(n), "first": torch.arange(5), "test": (x_test, y_test)},
                probe_x=x[:6])


def _config(tmp_path, name, **kw):
    base = dict(out=str(tmp_path / name), alphas=[1.0, 30.0], lr=0.3, momentum=0.9, batch_size=5, steps=[12],
                log_schedule="every", log_every=3, checkpoint_every=4, progress=False, dtype="float64")
    base.update(kw)
    return TrainConfig(**base).validate()


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _reference_losses(task, alpha, lr, momentum, batch_size, steps, seed, classes, reduction="mean"):
    """Independent loop: f^α written out, SGD with momentum by hand, same permutations."""
    torch.manual_seed(seed)
    model = task.model_factory().double()
    theta0 = copy.deepcopy(model)
    x, y = task.x.double(), (task.y.double() if classes == 1 else task.y)
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    perm, pos = None, n
    velocity = [torch.zeros_like(p) for p in model.parameters()]

    def f_alpha(inp):
        with torch.no_grad():
            f0 = theta0(inp)
        return f0 + alpha * (model(inp) - f0)

    def loss_of(out, target):
        if classes == 1:
            return nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), target, reduction="none")
        return nn.functional.cross_entropy(out, target, reduction="none")

    for _ in range(steps):
        if batch_size >= n:
            idx = torch.arange(n)
        else:
            if pos >= n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx, pos = perm[pos:pos + batch_size], pos + batch_size
        losses = loss_of(f_alpha(x[idx]), y[idx])
        objective = losses.sum() if reduction == "sum" else losses.mean()
        grads = torch.autograd.grad(objective, list(model.parameters()))
        with torch.no_grad():
            for p, v, gr in zip(model.parameters(), velocity, grads):
                v.mul_(momentum).add_(gr)
                p.sub_(lr / alpha**2 * v)
    with torch.no_grad():
        return {"train": loss_of(f_alpha(x), y).mean().item(), "first": loss_of(f_alpha(x[:5]), y[:5]).mean().item()}


@pytest.mark.parametrize("classes,batch_size,reduction", [(1, 5, "mean"), (3, 5, "mean"), (1, 0, "sum")])
def test_matches_hand_written_loop(tmp_path, classes, batch_size, reduction):
    task = _task(classes)
    lr = 0.3 if reduction == "mean" else 0.02
    cfg = _config(tmp_path, "run", batch_size=batch_size, probe=False, loss_reduction=reduction, lr=lr)
    rows = train(cfg, task)
    for alpha in cfg.alphas:
        last = [r for r in rows if r["alpha"] == alpha][-1]
        assert last["step"] == 12
        expected = _reference_losses(task, alpha, lr, 0.9, batch_size or 10**9, 12, cfg.seed, classes, reduction)
        for group in expected:
            assert last["groups"][group]["loss"] == pytest.approx(expected[group], rel=1e-9, abs=1e-12)
    # fork protocol: every α starts at the same f_θ0, so step-0 rows agree
    first = [r for r in rows if r["step"] == 0]
    assert len(first) == 2 and first[0]["groups"] == first[1]["groups"]


def test_kill_and_resume_logs_the_same_numbers(tmp_path):
    task = _task(3)
    reference = _strip(train(_config(tmp_path, "whole"), task))
    # killed after 9 steps of α = 1 (last checkpoint at 8, the row of step 9 is dropped), then
    # after 9 more: 4 to finish α = 1 and 5 of α = 30 (last checkpoint at its step 4)
    cfg = _config(tmp_path, "killed", stop_after=9)
    train(cfg, task)
    train(cfg, task)
    resumed = _strip(train(_config(tmp_path, "killed"), task))
    assert resumed == reference
    assert _strip(read_log(tmp_path / "killed")) == reference
    assert any(r["metrics"] for r in reference) and reference[-1]["metrics"]["sign_similarity"] < 1


def test_crash_in_callback_then_resume(tmp_path):
    """A crash (exception in the callback) in the middle of α = 30, rows scheduled by loss."""
    task = _task(1)
    options = dict(batch_size=7, log_schedule="loss", log_decay=0.9, steps=[30], checkpoint_every=5)
    reference = _strip(train(_config(tmp_path, "whole", **options), task))
    rows_30 = [r for r in reference if r["alpha"] == 30.0]
    assert len(rows_30) >= 5 and rows_30[3]["step"] > 5       # the schedule has advanced past a checkpoint

    def crash(row):
        if row["alpha"] == 30.0 and row["step"] == rows_30[3]["step"]:
            raise KeyboardInterrupt
    cfg = _config(tmp_path, "crashed", **options)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, task, callback=crash)
    assert _strip(train(cfg, task)) == reference


def test_resume_refuses_a_changed_config(tmp_path):
    task = _task(1)
    train(_config(tmp_path, "run", stop_after=5), task)
    with pytest.raises(ValueError, match="lr changed"):
        train(_config(tmp_path, "run", lr=0.1), task)
    rows = train(_config(tmp_path, "run", lr=0.1, resume=False), task)
    assert rows[0]["step"] == 0 and len({r["alpha"] for r in rows}) == 2


def test_same_minibatches_for_every_alpha():
    a, b = EpochSampler(10, 3, seed=4), EpochSampler(10, 3, seed=4)
    batches = [a.next() for _ in range(9)]
    assert all(torch.equal(u, b.next()) for u in batches)
    # each epoch is a permutation of the data, the last batch of an epoch being short
    assert sorted(torch.cat(batches[:4]).tolist()) == list(range(10))
    state = copy.deepcopy(a.state_dict())
    rest = [a.next() for _ in range(5)]
    b.load_state_dict(state)
    assert all(torch.equal(u, b.next()) for u in rest)
    assert torch.equal(EpochSampler(5, 0, 1).next(), torch.arange(5))


def test_log_schedule_by_loss():
    s = LogSchedule("loss", start=math.log(2), decay=0.96, every=0)
    thresholds = [math.log(2) * 0.96**k for k in range(40)]
    assert s.due(0, 0.7)
    assert not s.due(1, 0.6932)                                 # above log 2
    assert s.due(2, thresholds[0] - 1e-6) and s.k == 1
    assert not s.due(3, thresholds[1] + 1e-6)
    assert s.due(4, thresholds[1] - 1e-6) and s.k == 2
    assert s.due(5, thresholds[10] - 1e-6) and s.k == 11        # a big drop logs once
    assert not s.due(6, thresholds[10] - 2e-6)
    every = LogSchedule("every", 1.0, 0.5, every=3)
    assert [every.due(t, 0.0) for t in range(7)] == [True, False, False, True, False, False, True]


def test_load_config_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('task = "fasttangent.tasks.yinyang:task"\nlr = 1\nsteps = 50\n[task_args]\nn = 40\n')
    cfg = load_config(path, ["--lr=0.01", "--alphas=[1,100]", "--task_args.n_test=30", "--center=true"])
    assert cfg.lr == 0.01 and cfg.alphas == [1.0, 100.0] and cfg.steps == [50] and cfg.center is True
    assert cfg.task_args == {"n": 40, "n_test": 30}
    with pytest.raises(KeyError, match="unknown config keys"):
        load_config(path, ["--learning_rate=0.1"])
    with pytest.raises(ValueError, match="steps has 3 values"):
        load_config(path, ["--steps=[1,2,3]"])
    with pytest.raises(TypeError, match="batch_size"):
        load_config(path, ["--batch_size=0.5"])


def test_command_line_train_and_plot(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('task = "fasttangent.tasks.yinyang:task"\nalphas = [1, 100]\nsteps = 30\n'
                    'loss_reduction = "sum"\nprogress = false\n[task_args]\nn = 40\nn_test = 200\n')
    out = tmp_path / "run"
    assert main([str(path), f"--out={out}"]) == 0
    rows = read_log(out)
    assert {r["alpha"] for r in rows} == {1.0, 100.0}
    assert set(rows[-1]["groups"]) == {"train", "test", "test_eyes", "test_rest"}
    assert set(rows[-1]["metrics"]) == {"sign_similarity", "ntk_alignment", "repr_alignment"}
    assert json.loads((out / "config.json").read_text())["task_args"] == {"n": 40, "n_test": 200}
    assert plot_main([str(out)]) == 0 and (out / "training.png").stat().st_size > 1000


def test_augmentation_and_transform_resume_exactly(tmp_path):
    """With augmentation f_θ0 is recomputed per batch and the augmentation generator is part
    of the checkpoint: a killed run still logs the numbers of an uninterrupted one."""
    task = _task(3)
    task.transform = lambda x: 2.0 * x
    task.augment = lambda x, g: x + 0.3 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    reference = _strip(train(_config(tmp_path, "whole", checkpoint_every=5), task))
    cfg = _config(tmp_path, "killed", checkpoint_every=5, stop_after=7)
    train(cfg, task)
    assert _strip(train(_config(tmp_path, "killed", checkpoint_every=5), task)) == reference
    plain = _task(3)
    plain.transform = task.transform
    no_noise = _strip(train(_config(tmp_path, "plain", checkpoint_every=5), plain))
    assert no_noise[0]["groups"] == reference[0]["groups"]   # same start; evaluation is never augmented
    assert no_noise[-1]["train_loss"] != reference[-1]["train_loss"]   # augmentation changed training


def test_bool_mask_group_equals_its_index_group_and_bad_groups_raise(tmp_path):
    task = _task(3)
    mask = torch.zeros(24, dtype=torch.bool)
    mask[[3, 10, 17, 23]] = True
    task.groups = {"mask": mask, "indices": torch.tensor([3, 10, 17, 23])}
    rows = train(_config(tmp_path, "mask", alphas=[1.0], steps=[3]), task)
    assert all(r["groups"]["mask"] == r["groups"]["indices"] for r in rows)
    for bad, message in [(torch.tensor([], dtype=torch.long), "empty"), (torch.ones(5, dtype=torch.bool), "mask"),
                         (torch.tensor([0, 24]), "outside"), (torch.tensor([0.0, 1.0]), "index tensor")]:
        task.groups = {"bad": bad}
        with pytest.raises(ValueError, match=message):
            train(_config(tmp_path, f"bad_{message.replace(' ', '_')}", alphas=[1.0], steps=[1]), task)


@pytest.mark.parametrize("classes", [1, 10])
def test_one_training_example(tmp_path, classes):
    """The loss and the number of classes (the log schedule's start, log c) come from the
    output width, also for n = 1."""
    from fasttangent.alpha import AlphaScaled
    from fasttangent.train import _Data, _loss_kind
    task = _task(classes, n=1)
    task.groups, task.probe_x = {}, None
    rows = train(_config(tmp_path, "one", alphas=[1.0], steps=[2], batch_size=1, probe=False), task)
    assert len(rows) >= 2 and math.isfinite(rows[-1]["train_loss"])
    config = _config(tmp_path, "kind")
    net = AlphaScaled(task.model_factory().double(), 1.0)
    expected = ("logistic", 2) if classes == 1 else ("cross_entropy", 10)
    assert _loss_kind(config, net, _Data(task, config, torch.device("cpu"))) == expected


def test_a_dead_network_logs_nan_metrics_and_finishes(tmp_path, monkeypatch):
    """Once every ReLU is off the representation Gram is zero and its alignment has no value:
    the run goes on and logs NaN for it (a direct ``measure`` call raises)."""
    import fasttangent.train as train_module
    task = _task(1)
    task.groups = {}
    row = train_module._row

    def row_after_killing_every_unit(net, data, kind, probe, config, alpha, step, *rest):
        if step > 0:
            with torch.no_grad():
                net.model[2].bias.fill_(-1e3)   # the last ReLU is off for every example from now on
        return row(net, data, kind, probe, config, alpha, step, *rest)

    monkeypatch.setattr(train_module, "_row", row_after_killing_every_unit)
    rows = train(_config(tmp_path, "dead", alphas=[1.0], steps=[6]), task)
    assert all(math.isfinite(v) for v in rows[0]["metrics"].values())
    assert math.isnan(rows[-1]["metrics"]["repr_alignment"])
    assert len(rows) > 2
