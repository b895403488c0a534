"""The binary yin-yang task of the paper's Fig. 1, on the square [−1, 1]².

Geometry (all circles centred on the horizontal axis):

- base: label 1 above the horizontal axis (x₂ > 0), 0 below;
- the S-shaped boundary: inside the disk of radius 1/2 centred at (+1/2, 0) the label
  is 1 (class 1 bulges down into the bottom right), inside the disk of radius 1/2
  centred at (−1/2, 0) it is 0 (class 0 bulges up into the top left). The large
  same-class areas are therefore the top right (class 1) and the bottom left (class 0);
- the two "eyes": the disk of radius ``eye_radius`` (default 0.2) centred at (+1/2, 0)
  has label 0 and the one centred at (−1/2, 0) has label 1: each small disk carries
  the opposite label of its surroundings.

Outside the unit circle the label is simply the base half-plane label, so the whole
square is labelled. The map x ↦ −x swaps the two labels, so the classes are balanced.
"""
from __future__ import annotations

import torch
from torch import nn

HALF_RADIUS = 0.5
EYE_RADIUS = 0.2


def yinyang_labels(x: torch.Tensor, eye_radius: float = EYE_RADIUS) -> torch.Tensor:
    """Labels in {0, 1} (float, shape (n,)) of points ``x`` (n, 2) of the plane."""
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (n, 2), got {tuple(x.shape)}")
    right = torch.tensor([HALF_RADIUS, 0.0], dtype=x.dtype, device=x.device)
    dist_right = (x - right).norm(dim=1)
    dist_left = (x + right).norm(dim=1)
    label = x[:, 1] > 0
    label = torch.where(dist_right < HALF_RADIUS, True, label)
    label = torch.where(dist_left < HALF_RADIUS, False, label)
    label = torch.where(dist_right < eye_radius, False, label)
    label = torch.where(dist_left < eye_radius, True, label)
    return label.to(x.dtype if x.is_floating_point() else torch.float32)


def yinyang_dataset(n: int, generator: torch.Generator | None = None, eye_radius: float = EYE_RADIUS,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points uniform on [−1, 1]² and their labels: x (n, 2), y (n,) in {0., 1.}."""
    x = torch.rand(n, 2, generator=generator, dtype=dtype) * 2 - 1
    return x, yinyang_labels(x, eye_radius)


def yinyang_grid(size: int = 200, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Test points paving [−1, 1]²: a ``size`` × ``size`` grid of cell centres, shape
    (size², 2), row-major with x₂ (vertical) as the slow index from bottom to top."""
    centres = (torch.arange(size, dtype=dtype) + 0.5) / size * 2 - 1
    x2, x1 = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x1.reshape(-1), x2.reshape(-1)], dim=1)


def yinyang_mlp(width: int = 60, depth: int = 3) -> nn.Sequential:
    """The paper's MLP 2 → 60 → 60 → 60 → 1 with ReLU modules (PyTorch default init)."""
    layers, fan_in = [], 2
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 1))
    return nn.Sequential(*layers)


def eye_mask(x: torch.Tensor, eye_radius: float = EYE_RADIUS) -> torch.Tensor:
    """Boolean (n,): points of ``x`` (n, 2) inside one of the two small disks."""
    right = torch.tensor([HALF_RADIUS, 0.0], dtype=x.dtype, device=x.device)
    return ((x - right).norm(dim=1) < eye_radius) | ((x + right).norm(dim=1) < eye_radius)


def task(config):
    """The yin-yang task for ``fasttangent.train``: one dataset of ``n`` points drawn with
    ``config.seed``, the paper's MLP, and groups "train", "test" (``n_test`` fresh points),
    "test_eyes" and "test_rest" (test points inside / outside the small disks).

    ``config.task_args``: n (100), n_test (4000), eye_radius (0.2), width (60), depth (3)."""
    from ..train import Task
    args = {"n": 100, "n_test": 4000, "eye_radius": EYE_RADIUS, "width": 60, "depth": 3, **config.task_args}
    generator = torch.Generator().manual_seed(config.seed)
    x, y = yinyang_dataset(args["n"], generator, args["eye_radius"])
    x_test, y_test = yinyang_dataset(args["n_test"], generator, args["eye_radius"])
    eyes = eye_mask(x_test, args["eye_radius"])
    return Task(x=x, y=y, model_factory=lambda: yinyang_mlp(args["width"], args["depth"]),
                groups={"train": torch.arange(args["n"]), "test": (x_test, y_test),
                        "test_eyes": (x_test[eyes], y_test[eyes]), "test_rest": (x_test[~eyes], y_test[~eyes])},
                probe_x=x)
