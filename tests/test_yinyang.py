"""Yin-yang generator (hand-picked points) and the vectorized Fig. 1 reproduction."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasttangent.alpha import AlphaScaled, alpha_lr
from fasttangent.reproduce.yinyang import YinYangSetup, _initial_state, run_experiment, summarize
from fasttangent.tasks.yinyang import eye_mask, yinyang_dataset, yinyang_grid, yinyang_labels

HAND_PICKED = [
    ((0.0, 0.8), 1), ((0.0, -0.8), 0), ((0.9, 0.9), 1), ((-0.9, -0.9), 0),   # large areas and corners
    ((0.9, -0.1), 1), ((-0.9, 0.1), 0),                                       # the S bulges, near the rim
    ((0.5, -0.35), 1), ((-0.5, 0.35), 0),                                     # bulges, beside the eyes
    ((0.05, -0.05), 1), ((-0.05, 0.05), 0),                                   # the S crossing the centre
    ((0.5, 0.0), 0), ((0.5, 0.15), 0), ((0.62, -0.1), 0),                     # right eye: opposite of its bulge
    ((-0.5, 0.0), 1), ((-0.5, -0.15), 1), ((-0.38, 0.1), 1),                  # left eye
    ((0.5, 0.25), 1), ((-0.5, -0.25), 0),                                     # just outside the eyes
]


def test_labels_on_hand_picked_points():
    x = torch.tensor([p for p, _ in HAND_PICKED])
    assert yinyang_labels(x).tolist() == [float(label) for _, label in HAND_PICKED]


def test_point_symmetry_balance_and_eye_area():
    x, y = yinyang_dataset(20000, torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(yinyang_labels(-x), 1 - y)                    # x -> -x swaps the classes
    assert abs(y.mean().item() - 0.5) < 0.02
    # two disks of radius 0.2 cover 2·π·0.04 of the square's area 4
    assert eye_mask(x).float().mean().item() == pytest.approx(2 * math.pi * 0.04 / 4, abs=0.01)
    grid = yinyang_grid(4)
    assert grid.shape == (16, 2) and grid[0].tolist() == [-0.75, -0.75] and grid[1].tolist() == [-0.25, -0.75]


def test_vectorized_runs_match_a_plain_loop():
    """The vmapped GD of every run equals training that run alone with nn.Module + SGD."""
    setup = YinYangSetup(runs=3, curve_steps=25, max_steps=25, grid=10, probe_runs=1, thresholds=(0.6,))
    results = run_experiment(setup, log=lambda s: None)
    _, X, Y, _, models = _initial_state(setup)
    grid_x = yinyang_grid(setup.grid)
    grid_y = yinyang_labels(grid_x)
    for alpha in setup.alphas:
        for run in range(setup.runs):
            net = AlphaScaled(copy.deepcopy(models[run]), alpha)
            opt = torch.optim.SGD(net.parameters(), lr=alpha_lr(setup.lr, alpha))
            losses, grid_at_crossing = [], None
            for _ in range(setup.curve_steps + 1):
                per_example = F.binary_cross_entropy_with_logits(net(X[run]).squeeze(-1), Y[run], reduction="none")
                losses.append(per_example.mean().item())
                if grid_at_crossing is None and losses[-1] <= 0.6:
                    with torch.no_grad():
                        grid_at_crossing = F.binary_cross_entropy_with_logits(net(grid_x).squeeze(-1), grid_y,
                                                                              reduction="none")
                opt.zero_grad()
                per_example.sum().backward()
                opt.step()
            np.testing.assert_allclose(results[alpha]["curves"][:, run], losses, rtol=2e-4, atol=1e-5)
            crossing = results[alpha]["crossing"][0, run]
            assert crossing == next(t for t, v in enumerate(losses) if v <= 0.6)
            np.testing.assert_allclose(results[alpha]["grid_maps"][0, run], grid_at_crossing.numpy(),
                                       rtol=1e-3, atol=1e-4)


def test_short_run_shows_the_papers_claims():
    setup = YinYangSetup(runs=6, curve_steps=120, max_steps=500, grid=30, probe_runs=2)
    summary, delta_maps = summarize(run_experiment(setup, log=lambda s: None))
    claims = summary["claims"]
    faster = next(k for k in claims if k.startswith("alpha=1 trains faster"))
    assert claims[faster], summary["curves"]
    assert claims["alpha=100 keeps sign similarity and NTK alignment > 0.98 (mean over probed runs)"], summary
    assert claims["alpha=1 sign similarity and NTK alignment fall below 0.9 (mean over probed runs)"], summary
    assert summary["reached"][-1]["both"] >= 4, summary["reached"]
    assert claims["delta maps are not uniform (both signs present)"]
    for thr in setup.thresholds:
        d = summary[f"delta@{thr}"]
        assert d["eyes_mean"] > 0 and d["eyes_mean"] > d["outside_eyes_mean"], (thr, d)
    assert delta_maps.shape == (3, 30 * 30)
