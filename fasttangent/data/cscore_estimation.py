"""C-score estimation for datasets without published scores (Fashion-MNIST, digits).

Hold-out consistency (Jiang et al., 2021, eq. 7 of the paper):

    Ĉ(x, y) = mean over subset ratios r of  mean over models m with (x, y) ∉ D_m  1[f_m(x) = y],

where each D_m is a uniform random subset of ⌊r·n⌋ training examples. Many small models
(softmax regression or a one-hidden-layer ReLU MLP) are trained at once: their parameters
carry a leading model axis, so each step is one batched contraction per layer for all models
(models are independent: the gradient of the sum of their losses is each model's own gradient).

Learning-speed proxy (Jiang et al., Sec. 5): train a few replicas on all examples with
minibatches and average, over epochs and replicas, the softmax probability of the label
(or its correctness). Examples learned early score high.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch


def _init_params(kind: str, num_models: int, d: int, c: int, hidden: int, gen: torch.Generator, dtype, device) -> dict:
    def normal(*shape, std):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * std).to(device)

    if kind == "softmax":
        # Convex problem: start every model at zero so models differ only by their data.
        params = {"w": torch.zeros(num_models, d, c, dtype=dtype, device=device),
                  "b": torch.zeros(num_models, c, dtype=dtype, device=device)}
    elif kind == "mlp":
        params = {"w1": normal(num_models, d, hidden, std=math.sqrt(2.0 / d)),
                  "b1": torch.zeros(num_models, hidden, dtype=dtype, device=device),
                  "w2": normal(num_models, hidden, c, std=math.sqrt(1.0 / hidden)),
                  "b2": torch.zeros(num_models, c, dtype=dtype, device=device)}
    else:
        raise ValueError(f"model must be 'softmax' or 'mlp', got {kind!r}")
    return {k: v.requires_grad_() for k, v in params.items()}


def _forward_shared(params: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits (M, n, c) of all M models on shared inputs x (n, d): one batched contraction per layer."""
    if "w" in params:
        return torch.einsum("nd,mdc->mnc", x, params["w"]) + params["b"][:, None]
    hidden = torch.relu(torch.einsum("nd,mdh->mnh", x, params["w1"]) + params["b1"][:, None])
    return torch.bmm(hidden, params["w2"]) + params["b2"][:, None]


def _forward_each(params: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits (M, b, c) of model m on its own inputs x[m], x: (M, b, d)."""
    if "w" in params:
        return torch.bmm(x, params["w"]) + params["b"][:, None]
    hidden = torch.relu(torch.bmm(x, params["w1"]) + params["b1"][:, None])
    return torch.bmm(hidden, params["w2"]) + params["b2"][:, None]


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (M, n) of logits (M, n, c) against labels y (n,) or (M, n)."""
    y = y.expand(logits.shape[:2])
    return torch.logsumexp(logits, -1) - logits.gather(2, y.unsqueeze(-1)).squeeze(-1)


def _prepare(x, y, num_classes, device):
    x = torch.as_tensor(x)
    device = x.device if device is None else torch.device(device)
    x = x.reshape(len(x), -1).to(device=device, dtype=torch.float32)
    y = torch.as_tensor(y).to(device=device, dtype=torch.long)
    if y.shape != (len(x),):
        raise ValueError(f"y must have shape ({len(x)},) to match x, got {tuple(y.shape)}")
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    return x, y, c, device


def _train_on_subsets(x, y, c, include, *, model, hidden, steps, lr, weight_decay, gen):
    """Full-batch AdamW on each model's subset (include: (M, n) bool). Returns logits (M, n, c)."""
    params = _init_params(model, include.shape[0], x.shape[1], c, hidden, gen, x.dtype, x.device)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    weights = include.to(x.dtype) / include.sum(1, keepdim=True).clamp_min(1).to(x.dtype)
    for _ in range(steps):
        logits = _forward_shared(params, x)
        ce = _cross_entropy(logits, y)  # (M, n)
        # Sum of per-model mean losses: each model's gradient is that of its own loss.
        loss = (weights * ce).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return _forward_shared(params, x)


def holdout_cscores(
    x,
    y,
    num_classes: Optional[int] = None,
    *,
    subset_ratios: Sequence[float] = (0.25, 0.5, 0.75),
    models_per_ratio: int = 32,
    model: str = "softmax",
    hidden: int = 64,
    steps: int = 300,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    soft: bool = False,
    models_per_chunk: int = 64,
    seed: int = 0,
    device=None,
) -> torch.Tensor:
    """Hold-out consistency scores (estimated C-scores) of every training example.

    x: (n, ...) inputs (flattened to (n, d)); y: (n,) int labels. For each ratio r,
    ``models_per_ratio`` models are trained (full-batch AdamW, ``steps`` steps) on uniform
    random subsets of size ⌊r·n⌋; example i's score at ratio r is the fraction of the
    models that did not see it which predict y_i (``soft=True``: their mean probability
    of y_i). The returned (n,) float32 score averages the ratios at which i was held out
    at least once; an example never held out gets NaN (with a warning; use more models).
    Models are trained ``models_per_chunk`` at a time to bound memory.
    """
    x, y, c, device = _prepare(x, y, num_classes, device)
    n = len(x)
    gen = torch.Generator().manual_seed(seed)
    per_ratio = []
    for ratio in subset_ratios:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"subset ratios must lie in (0, 1), got {ratio}")
        hits = torch.zeros(n, device=device)
        held = torch.zeros(n, device=device)
        for start in range(0, models_per_ratio, models_per_chunk):
            m = min(models_per_chunk, models_per_ratio - start)
            order = torch.rand(m, n, generator=gen).argsort(dim=1)
            include = torch.zeros(m, n, dtype=torch.bool)
            include.scatter_(1, order[:, : int(ratio * n)], True)
            include = include.to(device)
            logits = _train_on_subsets(x, y, c, include, model=model, hidden=hidden, steps=steps, lr=lr,
                                       weight_decay=weight_decay, gen=gen)
            if soft:
                right = logits.softmax(-1).gather(2, y.expand(m, -1).unsqueeze(-1)).squeeze(-1)
            else:
                right = (logits.argmax(-1) == y).to(hits.dtype)
            out = ~include
            hits += (right * out).sum(0)
            held += out.sum(0)
        per_ratio.append(torch.where(held > 0, hits / held.clamp_min(1), torch.full_like(hits, float("nan"))))
    scores = torch.stack(per_ratio).nanmean(0)
    never = int(torch.isnan(scores).sum())
    if never:
        warnings.warn(
            f"{never} example(s) were never held out; their score is NaN (raise models_per_ratio)", stacklevel=2
        )
    return scores


def learning_speed_scores(
    x,
    y,
    num_classes: Optional[int] = None,
    *,
    model: str = "softmax",
    hidden: int = 64,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    replicas: int = 4,
    measure: str = "confidence",
    seed: int = 0,
    device=None,
) -> torch.Tensor:
    """Learning-speed proxy of the C-score: how early in training each example is fit.

    ``replicas`` models (different initializations and minibatch orders, trained together)
    run ``epochs`` epochs of minibatch AdamW on all n examples; after every epoch each
    example's softmax probability of its label (``measure="confidence"``) or its
    correctness (``"correct"``) is recorded. Returns the (n,) float32 mean over epochs
    and replicas.
    """
    if measure not in ("confidence", "correct"):
        raise ValueError(f"measure must be 'confidence' or 'correct', got {measure!r}")
    x, y, c, device = _prepare(x, y, num_classes, device)
    n = len(x)
    gen = torch.Generator().manual_seed(seed)
    params = _init_params(model, replicas, x.shape[1], c, hidden, gen, x.dtype, device)
    if model == "softmax":
        # Zero init would make the replicas identical up to minibatch order; small noise separates them.
        with torch.no_grad():
            params["w"].add_((torch.randn(params["w"].shape, generator=gen) * 0.01).to(device))
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    total = torch.zeros(n, device=device)
    for _ in range(epochs):
        order = torch.rand(replicas, n, generator=gen).argsort(dim=1).to(device)
        for start in range(0, n, batch_size):
            idx = order[:, start:start + batch_size]  # (R, b): each replica its own minibatch
            logits = _forward_each(params, x[idx])
            loss = _cross_entropy(logits, y[idx]).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = _forward_shared(params, x)
            if measure == "confidence":
                total += logits.softmax(-1).gather(2, y.expand(replicas, -1).unsqueeze(-1)).squeeze(-1).sum(0)
            else:
                total += (logits.argmax(-1) == y).float().sum(0)
    return total / (epochs * replicas)


def score_agreement(a, b) -> float:
    """Spearman rank correlation of two score vectors (n,), ignoring positions where either is NaN."""
    import numpy as np
    from scipy.stats import spearmanr

    a = np.asarray(torch.as_tensor(a).detach().cpu(), dtype=np.float64)
    b = np.asarray(torch.as_tensor(b).detach().cpu(), dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"score vectors must be 1-d of the same length, got {a.shape} and {b.shape}")
    ok = ~(np.isnan(a) | np.isnan(b))
    return float(spearmanr(a[ok], b[ok]).statistic)
