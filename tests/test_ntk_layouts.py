"""ft.ntk_gram on layers that break the rules' assumptions (examples not first, modules
without a working vmap rule), against a reference built with plain autograd, one example
and one output at a time (no torch.func, whose vmap rules are what some of these break)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fasttangent as ft
from references import loop_jacobian, loop_reference


class TimeFirst(nn.Module):
    """A Linear on (T, n, d): the examples are its second dimension."""

    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(x.transpose(0, 1))).mean(0))


class Positions(nn.Module):
    """A custom layer given a (T, d) table that is not per example."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3) / 2)

    def forward(self, x, table):
        return torch.tanh((x + table) @ self.weight)


class WithPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.positions = Positions()
        self.register_buffer("table", torch.randn(3, 4))
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.positions(x, self.table).mean(1))


class Prototypes(nn.Module):
    """A Linear applied to the inputs and to P learned prototypes."""

    def __init__(self, count):
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.prototypes = nn.Parameter(torch.randn(count, 4))

    def forward(self, x):
        return torch.tanh(self.inner(x)) @ torch.tanh(self.inner(self.prototypes)).T


class SequenceFirstAttention(nn.Module):
    """nn.MultiheadAttention with its default batch_first=False."""

    def __init__(self):
        super().__init__()
        self.attention, self.out = nn.MultiheadAttention(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        xt = x.transpose(0, 1)
        return self.out(self.attention(xt, xt, xt, need_weights=False)[0].mean(0))


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn, self.out = cell(4, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


class RecurrentState(nn.Module):
    """A one-layer GRU whose final state h_n (layers, n, H) is used: one example cannot show
    that its first dimension is not the examples."""

    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.rnn(x)[1][0])


class Twice(nn.Module):
    """A module without a rule (PReLU) called twice, and a forward pre-hook that scales the
    input of a Linear."""

    def __init__(self):
        super().__init__()
        self.inner, self.act, self.out = nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 3)
        self.out.register_forward_pre_hook(lambda module, args: (2.0 * args[0],))

    def forward(self, x):
        return self.out(self.act(self.inner(self.act(x))))


class LoopKeepingBatchDim(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 3)

    def forward(self, x):
        return torch.cat([torch.tanh(self.inner(x[i:i + 1])) for i in range(x.shape[0])])


class VmapInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return torch.func.vmap(self.body)(x)


class Hypernetwork(nn.Module):
    """The target's own weight is swapped out for a generated one (it gets no gradient)."""

    def __init__(self):
        super().__init__()
        self.code, self.generator = nn.Parameter(torch.randn(1, 3)), nn.Linear(3, 3 * 4)
        self.target = nn.Linear(4, 3)

    def forward(self, x):
        weight = self.generator(self.code).reshape(3, 4)
        return torch.func.functional_call(self.target, {"weight": weight}, (x,))


class DependentOutputs(nn.Module):
    """A module without a rule returning h and h @ v, both used by the network."""

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.u, self.v = nn.Parameter(torch.randn(4, 4) / 2), nn.Parameter(torch.randn(4, 4) / 2)

        def forward(self, x):
            h = torch.tanh(x @ self.u)
            return h, h @ self.v

    def __init__(self):
        super().__init__()
        self.pair, self.out = DependentOutputs.Pair(), nn.Linear(8, 3)

    def forward(self, x):
        h, y = self.pair(x)
        return self.out(torch.cat([h, y], dim=1))


class ModuleMadeInForward(nn.Module):
    """A decoder module built inside forward around the embedding's weight."""

    class Decoder(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, h):
            return torch.nn.functional.linear(h, self.weight)

    def __init__(self):
        super().__init__()
        self.embedding, self.inner = nn.Linear(3, 4), nn.Linear(3, 3)

    def forward(self, x):
        return ModuleMadeInForward.Decoder(self.embedding.weight)(torch.tanh(self.inner(torch.tanh(x))))


CASES = {
    # T = n = 3: the wrong dimension would pass every shape check
    "time_first_T_equals_n": (TimeFirst, (3, 3, 4)),
    "time_first": (TimeFirst, (4, 3, 4)),
    "table_T_equals_n": (WithPositions, (3, 3, 4)),
    "prototypes_P_equals_n": (lambda: Prototypes(5), (5, 4)),
    "prototypes": (lambda: Prototypes(3), (5, 4)),
    "sequence_first_attention": (SequenceFirstAttention, (4, 3, 4)),
    "prelu": (lambda: nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 5), nn.PReLU(5), nn.Linear(5, 3)),
              (6, 4)),
    "lstm": (lambda: Recurrent(nn.LSTM), (4, 3, 4)),
    "gru": (lambda: Recurrent(nn.GRU), (4, 3, 4)),
    "gru_final_state": (RecurrentState, (4, 3, 4)),
    "module_twice_and_pre_hook": (Twice, (5, 4)),
    "loop_keeping_batch_dim": (LoopKeepingBatchDim, (5, 4)),
    "vmap_inside": (VmapInside, (5, 4)),
    "hypernetwork": (Hypernetwork, (5, 4)),
    "dependent_outputs": (DependentOutputs, (5, 4)),
    "module_made_in_forward": (ModuleMadeInForward, (5, 3)),
}


def test_sparse_embedding_matches_its_dense_twin():
    torch.manual_seed(0)
    sparse = nn.Sequential(nn.Embedding(7, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)).double()
    dense = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    dense.load_state_dict(sparse.state_dict())
    tokens = torch.randint(0, 7, (4, 2))
    reference = loop_reference(dense, tokens)
    assert ((ft.ntk_gram(sparse, tokens) - reference).norm() / reference.norm()).item() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_loop_reference(name, dtype):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model = factory().to(dtype).eval()
    x = torch.randn(*shape, dtype=dtype)
    reference = loop_reference(model.double(), x.double())
    K = ft.ntk_gram(model.to(dtype), x)
    error = ((K.double() - reference).norm() / reference.norm()).item()
    assert error < (1e-5 if dtype == torch.float32 else 1e-10)


class SortsTheBatch(nn.Module):
    """Per-example, but a layer sees the batch sorted (as length-sorted packing does): its
    row j is example perm[j], not j, so it must not be taken row by row."""

    def __init__(self):
        super().__init__()
        self.inner, self.middle, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)
        self.gain = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        order = torch.argsort(x[:, 0])
        h = torch.tanh(self.middle(h[order]) * self.gain)
        return self.head(h[torch.argsort(order)])


def test_a_sorted_batch_is_not_taken_row_by_row():
    torch.manual_seed(0)
    model = SortsTheBatch().double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    reference = loop_reference(model, x)
    for kwargs in ({}, {"block_size": 4}):
        K = ft.ntk_gram(model, x, **kwargs)
        assert ((K - reference).norm() / reference.norm()).item() < 1e-10, kwargs


class FlipsTheBatch(nn.Module):
    """Per-example, but an op sees the batch reversed (a reversal is its own inverse, so a
    swapped pair alone cannot reveal it)."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 5), nn.Linear(5, 2)
        self.gain = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = torch.tanh(self.inner(x)).flip(0) * self.gain
        return self.head(torch.tanh(h.flip(0)))


class RoutesTheBatch(nn.Module):
    """A stable partition of the batch by a gate (MoE-style dispatch), undone after an op."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.gain = nn.Parameter(torch.randn(5))

    def forward(self, x):
        gate = x[:, 0] > 0
        order = torch.cat([gate.nonzero().squeeze(1), (~gate).nonzero().squeeze(1)])
        y = torch.tanh(self.inner(x)[order] * self.gain)
        return self.head(y[torch.argsort(order)])


@pytest.mark.parametrize("factory", [FlipsTheBatch, RoutesTheBatch], ids=lambda f: f.__name__)
def test_a_permuted_batch_is_not_taken_row_by_row(factory):
    torch.manual_seed(0)
    model = factory().double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    x[:, 0] = torch.tensor([1.0, 2.0, -1.0, 3.0, -2.0, 1.0])  # the first two examples share a route
    reference = loop_reference(model, x)
    for x2 in (None, x):
        K = ft.ntk_gram(model, x, x2)
        assert ((K - reference).norm() / reference.norm()).item() < 1e-10


def test_observing_tensor_hooks_from_forward_hooks():
    """A Grad-CAM-style forward hook that stores its output's gradient (observes only)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    seen = []
    model[0].register_forward_hook(lambda mod, inputs, out: out.register_hook(seen.append) and None)
    x = torch.randn(5, 4, dtype=torch.float64)
    reference = loop_reference(model, x)
    assert ((ft.ntk_gram(model, x) - reference).norm() / reference.norm()).item() < 1e-10


class ScaleTwice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return 2 * w

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class WeightAlsoInFunction(nn.Module):
    """A Linear's weight is also used by the parent inside an autograd.Function, which no
    TorchFunctionMode sees: the Linear rule alone would miss that use."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        return self.head(torch.cat([h, torch.tanh(h @ ScaleTwice.apply(self.inner.weight))], dim=1))


class HookScalesOutputInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 5), nn.Linear(5, 2)
        self.inner.register_forward_hook(self._double)

    @staticmethod
    def _double(module, inputs, out):
        out.mul_(2)  # returns None: the output object stays, its values change

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)))


@pytest.mark.parametrize("factory", [WeightAlsoInFunction, HookScalesOutputInPlace], ids=lambda f: f.__name__)
def test_uses_and_changes_outside_the_rules_sight(factory):
    torch.manual_seed(0)
    model = factory().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    reference = loop_reference(model, x)
    for kwargs in ({}, {"outputs": "full"}):
        K = ft.ntk_gram(model, x, **kwargs)
        K = K.diagonal(dim1=2, dim2=3).sum(-1) if K.dim() == 4 else K
        assert ((K - reference).norm() / reference.norm()).item() < 1e-10, kwargs


def test_gradient_changing_tensor_hook_from_a_forward_hook():
    """A forward hook puts a hook that triples the gradient on a (non-first) layer's output:
    a gradient taken with respect to that output comes before the hook, so the layer goes
    to the generic rule."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[2].register_forward_hook(lambda mod, inputs, out: out.register_hook(lambda g: 3 * g) and None)
    x = torch.randn(5, 4, dtype=torch.float64)
    J = loop_jacobian(model, x)
    full = torch.einsum("iap,jbp->ijab", J, J)
    assert torch.allclose(ft.ntk_gram(model, x), full.diagonal(dim1=2, dim2=3).sum(-1), rtol=1e-10, atol=1e-12)
    assert torch.allclose(ft.ntk_gram(model, x, outputs="full"), full, rtol=1e-10, atol=1e-12)
