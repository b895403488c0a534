"""C-score estimators: hold-out consistency and the learning-speed proxy."""
import numpy as np
import pytest
import torch

import fasttangent.data as D
from fasttangent.data.cscore_estimation import _init_params, _train_on_subsets


def _mislabeled_clusters(n=300, d=10, classes=3, fraction=0.1, seed=0):
    """Well-separated Gaussian clusters with a known set of mislabeled examples."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=gen) * 3.0
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, d, generator=gen)
    noisy, flipped = D.label_noise(y, fraction, classes, seed=seed)
    mislabeled = torch.zeros(n, dtype=torch.bool)
    mislabeled[flipped] = True
    return x, noisy, mislabeled


def _separation(scores, mislabeled):
    """Fraction of (mislabeled, clean) pairs ranked correctly (the AUC of 'score < clean')."""
    s, m = scores.numpy(), mislabeled.numpy()
    return float((s[m][:, None] < s[~m][None, :]).mean() + 0.5 * (s[m][:, None] == s[~m][None, :]).mean())


@pytest.mark.parametrize("model", ["softmax", "mlp"])
def test_holdout_scores_flag_mislabeled(model):
    x, y, mislabeled = _mislabeled_clusters()
    scores = D.holdout_cscores(x, y, 3, subset_ratios=(0.5, 0.75), models_per_ratio=12, model=model, hidden=16,
                               steps=80, lr=0.05, seed=0)
    assert scores.shape == (300,) and not torch.isnan(scores).any()
    assert scores[mislabeled].mean() < 0.2 and scores[~mislabeled].mean() > 0.85
    assert _separation(scores, mislabeled) > 0.95


def test_learning_speed_flags_mislabeled_and_agrees():
    x, y, mislabeled = _mislabeled_clusters(seed=1)
    fast = D.learning_speed_scores(x, y, 3, epochs=6, batch_size=32, replicas=3, lr=0.05, seed=0)
    assert fast.shape == (300,) and fast.min() >= 0 and fast.max() <= 1
    assert _separation(fast, mislabeled) > 0.95
    correct = D.learning_speed_scores(x, y, 3, epochs=6, batch_size=32, replicas=3, lr=0.05, measure="correct")
    assert _separation(correct, mislabeled) > 0.9
    holdout = D.holdout_cscores(x, y, 3, subset_ratios=(0.5,), models_per_ratio=12, steps=60, lr=0.05)
    assert D.score_agreement(holdout, fast) > 0.3


def test_holdout_uses_only_models_that_did_not_see_the_example():
    # Random labels, more features than training examples: each model fits its own subset
    # perfectly, yet predicts held-out labels at chance. Scoring with the models that saw an
    # example would give ≈ 1.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 200, generator=gen)
    y = (torch.arange(120) % 2)[torch.randperm(120, generator=gen)]
    include = torch.rand(4, 120, generator=gen) < 0.5
    logits = _train_on_subsets(x, y, 2, include, model="softmax", hidden=0, steps=150, lr=0.05, weight_decay=0.0,
                               gen=torch.Generator().manual_seed(0))
    right = logits.argmax(-1) == y
    assert right[include].float().mean() == 1.0
    scores = D.holdout_cscores(x, y, 2, subset_ratios=(0.5,), models_per_ratio=24, steps=150, lr=0.05,
                               weight_decay=0.0)
    assert 0.35 < scores.mean().item() < 0.65


def test_vectorized_training_matches_one_model_at_a_time():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    include = torch.rand(3, 40, generator=gen) < 0.6
    batched = _train_on_subsets(x, y, 3, include, model="mlp", hidden=7, steps=25, lr=0.02, weight_decay=1e-3,
                                gen=torch.Generator().manual_seed(9))
    init = _init_params("mlp", 3, 5, 3, 7, torch.Generator().manual_seed(9), torch.float32, "cpu")
    for m in range(3):
        w1, b1, w2, b2 = (init[k][m].detach().clone().requires_grad_() for k in ("w1", "b1", "w2", "b2"))
        opt = torch.optim.AdamW([w1, b1, w2, b2], lr=0.02, weight_decay=1e-3)
        xs, ys = x[include[m]], y[include[m]]
        for _ in range(25):
            loss = torch.nn.functional.cross_entropy(torch.relu(xs @ w1 + b1) @ w2 + b2, ys)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            alone = torch.relu(x @ w1 + b1) @ w2 + b2
        assert torch.allclose(batched[m], alone, atol=1e-4)


def test_score_agreement_hand_computed():
    # d = (0, 1, −1, 0): ρ = 1 − 6·2 / (4·15) = 0.8
    assert D.score_agreement([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    assert D.score_agreement([1.0, 2.0, float("nan"), 4.0, 5.0], [5.0, 4.0, 0.0, 2.0, 1.0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same length"):
        D.score_agreement(np.zeros(3), np.zeros(4))
