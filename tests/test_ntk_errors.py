"""ft.ntk_gram's error messages: each names the problem and the fix."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fasttangent as ft
from references import loop_jacobian


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        ft.ntk_gram(model, torch.randn(4, 3))


def test_batchnorm_without_running_stats():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match="track_running_stats=True"):
        ft.ntk_gram(model, torch.randn(4, 3))


def test_no_parameter_requires_grad():
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameter.*requires_grad_\(True\)"):
        ft.ntk_gram(model, torch.randn(4, 3))


def test_x1_x2_shape_mismatch():
    with pytest.raises(ValueError, match="same shape beyond the batch dimension"):
        ft.ntk_gram(_mlp(), torch.randn(4, 3), torch.randn(2, 5))


def test_nan_in_outputs():
    x = torch.randn(4, 3)
    x[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf \(examples \[2\].*check the inputs"):
        ft.ntk_gram(_mlp(), x)


def test_inf_in_outputs():
    model = _mlp()
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ft.ntk_gram(model, torch.randn(4, 3))


@pytest.mark.parametrize("outputs", [2, -1, 10])
def test_outputs_out_of_range(outputs):
    with pytest.raises(ValueError, match=r"out of range.*c=2.*\[0, 1\]"):
        ft.ntk_gram(_mlp(), torch.randn(4, 3), outputs=outputs)


@pytest.mark.parametrize("outputs", ["diag", None, 1.0, True])
def test_outputs_invalid(outputs):
    with pytest.raises(ValueError, match=r"invalid; use 'trace', 'full' or an output index"):
        ft.ntk_gram(_mlp(), torch.randn(4, 3), outputs=outputs)


@pytest.mark.parametrize("kwargs, message", [
    ({"reduce": "max"}, "reduce='max' is invalid; use 'sum' or 'mean'"),
    ({"block_size": 0}, "block_size must be a positive int"),
    ({"conv_form": "fast"}, "conv_form='fast' is invalid"),
    ({"backend": "tpu"}, "backend='tpu' is not one of"),
])
def test_invalid_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ft.ntk_gram(_mlp(), torch.randn(4, 3), **kwargs)


def test_backend_that_cannot_run_says_why():
    with pytest.raises(ValueError, match="cuda"):
        ft.ntk_gram(_mlp(), torch.randn(4, 3), backend="cuda")


def test_input_modified_in_place_after_use():
    class InPlaceAfterUse(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = torch.tanh(x)
            out = self.lin(h)
            h.mul_(2)  # the Linear's recorded input changes after the call
            return out + h.sum(dim=1, keepdim=True)

    with pytest.raises(RuntimeError, match="modified in place.*out-of-place"):
        ft.ntk_gram(InPlaceAfterUse(), torch.randn(4, 3))


def test_non_tensor_model_output():
    class ReturnsDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.lin(x)}

    with pytest.raises(TypeError, match="tensor output.*wrap the model"):
        ft.ntk_gram(ReturnsDict(), torch.randn(4, 3))


def test_input_dtypes_and_empty_inputs():
    with pytest.raises(ValueError, match="x1 is torch.float32 and x2 is torch.float64"):
        ft.ntk_gram(_mlp(), torch.randn(4, 3), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="x1 has no examples"):
        ft.ntk_gram(_mlp(), torch.randn(0, 3))
    with pytest.raises(ValueError, match="x2 has no examples"):
        ft.ntk_gram(_mlp(), torch.randn(4, 3), torch.randn(0, 3))


def test_inference_mode_is_refused_rather_than_giving_zeros():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode.*torch.no_grad is fine"):
        ft.ntk_gram(_mlp(), torch.randn(4, 3))


def test_reduce_mean_with_full_outputs():
    with pytest.raises(ValueError, match="reduce='mean'.*outputs='full'"):
        ft.ntk_gram(_mlp(), torch.randn(4, 3), outputs="full", reduce="mean")


def test_numpy_integers_and_keyword_inputs_are_accepted():
    np = pytest.importorskip("numpy")
    model, x = _mlp(), torch.randn(5, 3)
    expected = ft.ntk_gram(model, x, outputs=1, block_size=2)
    torch.testing.assert_close(ft.ntk_gram(model, x, outputs=np.int64(1), block_size=np.int64(2)), expected)

    class KeywordCall(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner[2](input=self.inner[1](self.inner[0](input=x)))

    torch.testing.assert_close(ft.ntk_gram(KeywordCall(model), x, outputs=1), expected)


def test_squeezed_outputs():
    """A scalar head ending in .squeeze() gives () for one example: read as c = 1. A squeeze
    that leaves (c,) for one example cannot be read, and the error says why."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    class Squeezed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).squeeze()

    x = torch.randn(5, 3)
    torch.testing.assert_close(ft.ntk_gram(Squeezed(head), x), ft.ntk_gram(head, x))
    with pytest.raises(ValueError, match=r"\(2,\) for a batch of 1.*squeeze\(-1\)"):
        ft.ntk_gram(Squeezed(nn.Sequential(nn.Linear(3, 2, bias=False).requires_grad_(True),
                                           nn.Unflatten(1, (1, 2)))), x)


def test_dropout_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Dropout '1' is in training mode.*model\.eval\(\)"):
        ft.ntk_gram(model, torch.randn(4, 3))
    ft.ntk_gram(model.eval(), torch.randn(4, 3))
    ft.ntk_gram(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Linear(4, 2)), torch.randn(4, 3))  # p = 0


def test_attention_dropout_in_training_mode_raises():
    model = nn.Sequential(nn.Linear(3, 4))
    model.attention = nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True)
    with pytest.raises(ValueError, match="training mode with dropout"):
        ft.ntk_gram(model.train(), torch.randn(2, 3))


class NoisyInEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 2)

    def forward(self, x):
        h = self.inner(x)
        return h + 0.1 * torch.randn_like(h)


class CentersTheBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 2)

    def forward(self, x):
        h = self.inner(x)
        return h - h.mean(0)


@pytest.mark.parametrize("factory", [NoisyInEval, CentersTheBatch], ids=lambda f: f.__name__)
def test_a_model_that_is_not_per_example_raises(factory):
    with pytest.raises(ValueError, match="depends on the other examples of the batch or is random"):
        ft.ntk_gram(factory().eval(), torch.randn(4, 3))


class CachedTranspose(nn.Module):
    """w.t() computed once in __init__: the forward reaches w through a node made before it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 4))
        self.wt = self.w.t()

    def forward(self, x):  # (n, 4)
        return x @ self.wt + (x * self.w[0]).sum(1, keepdim=True)


class LazyCache(nn.Module):
    """w.t() cached on the first call: ntk_gram's own first forward pass fills the cache."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 4))
        self.wt = None

    def forward(self, x):
        if self.wt is None:
            self.wt = self.w.t()
        return x @ self.wt


class ViewsFromInit(nn.Module):
    """Rows of w taken apart in __init__ (views: right values, but a path no rule re-runs)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 4))
        self.wa, self.wb = self.w.unbind(0)

    def forward(self, x):
        return torch.stack([x @ self.wa, torch.tanh(x @ self.wb)], dim=1)


class CacheByBatchSize(nn.Module):
    """A tensor cached per batch size: the one-example probe never meets the batches' entry,
    two passes over the same number of examples do."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.head = nn.Linear(4, 2)
        self.cache = {}

    def forward(self, x):
        if x.shape[0] not in self.cache:
            self.cache[x.shape[0]] = self.w * 2
        return self.head(torch.tanh(x @ self.cache[x.shape[0]]))


@pytest.mark.parametrize("factory", [CachedTranspose, LazyCache, ViewsFromInit, CacheByBatchSize])
def test_tensors_computed_outside_the_forward_pass_are_refused(factory):
    with pytest.raises(ValueError, match=r"\['w'\] through tensors computed outside the forward pass"):
        ft.ntk_gram(factory(), torch.randn(3, 4))


def test_weights_cached_by_parametrize_are_refused():
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import orthogonal
    model = nn.Sequential(orthogonal(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    ft.ntk_gram(model, x)  # recomputed in every forward: fine
    with parametrize.cached():  # filled by ntk_gram's first pass, or before it
        with pytest.raises(ValueError, match="computed outside the forward pass"):
            ft.ntk_gram(model, x)
        model(x)
        with pytest.raises(ValueError, match="computed outside the forward pass"):
            ft.ntk_gram(model, x)


class WorkerThreadBranch(nn.Module):
    """A branch computed in a worker thread during the forward: its nodes are the forward's
    own (autograd numbers nodes per thread, so their order says nothing)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(8, 3)

    def forward(self, x):
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            branch = pool.submit(self.b, x)
            return self.head(torch.cat([self.a(x), branch.result()], -1))


def test_a_forward_using_worker_threads_is_not_refused():
    model = WorkerThreadBranch().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    J = loop_jacobian(model, x)
    assert torch.allclose(ft.ntk_gram(model, x), torch.einsum("iap,jap->ij", J, J), rtol=1e-10, atol=1e-12)
