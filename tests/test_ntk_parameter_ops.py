"""Parameters used directly by ops (class tokens, position embeddings, layer scales, tied
decoders): ft.ntk_gram owns them by their ops (``gram.ops``) instead of running a whole
module on the generic rule. Checked against plain-autograd references, with the ownership
each model should get."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fasttangent as ft
from fasttangent.gram.engine import GramEngine
from fasttangent.gram.ops import ParameterOp
from fasttangent.gram.rules import generic_rule
from references import loop_jacobian


class TokenModel(nn.Module):
    """ViT-style: a class token expanded over the batch and concatenated, a position
    embedding added, a layer scale, a head on the class token."""

    def __init__(self, d=6, tokens=3):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.class_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, d))
        self.mix = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.randn(d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # x (n, tokens, 4)
        h = self.embed(x)
        h = torch.cat([self.class_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        h = h + self.scale * torch.tanh(self.mix(h))
        return self.head(self.norm(h)[:, 0])


class ConvLayerScale(nn.Module):
    """ConvNeXt-style: a per-channel scale (C, 1, 1) times a conv branch, added back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GELU())
        self.layer_scale = nn.Parameter(torch.randn(4, 1, 1))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.layer_scale * self.branch(h)
        return self.head(h.mean((2, 3)))


class TiedDecoder(nn.Module):
    """A decoder tied to the embedding through F.linear (the same weight in two ops)."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, tokens):  # (n, T) -> (n, vocab)
        h = torch.tanh(self.mix(self.embedding(tokens))).mean(1)
        return F.linear(h, self.embedding.weight)


class ScaledWeight(nn.Module):
    """The weight is rescaled before the conv: ``w * s`` does not see the examples, its
    result is a shared tensor of the group, and the conv using it is the group's op."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2, 3, 3))
        self.gain = nn.Parameter(torch.randn(3, 1, 1, 1))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = F.conv2d(x, self.weight * self.gain, padding=1)
        return self.head(torch.tanh(h).mean((2, 3)))


class InPlaceScale(nn.Module):
    """``h.mul_(gain)`` overwrites the op's input: its value is lost, so the op cannot own gain."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.gain = nn.Parameter(torch.randn(5))
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = self.inner(x)
        return self.head(torch.tanh(h.mul_(self.gain)))


class SlicedPositions(nn.Module):
    """``pos[:, :T]``: one table for all examples (a shared tensor), added to each example."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.pos = nn.Parameter(torch.randn(1, 6, 5))
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # (n, T, 4), T < 6
        h = self.inner(x) + self.pos[:, :x.shape[1]]
        return self.head(torch.tanh(h).mean(1))


class TwoOpsOneParameter(nn.Module):
    """One parameter used by two ops, one of them without per-example arguments."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 3)
        self.g = nn.Parameter(torch.randn(1, 3))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.sin(self.inner(x) * self.g)
        return self.head(torch.cat([h, self.g.expand(x.shape[0], -1) ** 2], dim=1))


CASES = {
    # name: (model factory, input factory, ParameterOp owners expected, generic modules expected)
    "tokens": (TokenModel, lambda n: torch.randn(n, 3, 4, dtype=torch.float64), 3, 0),
    "conv_layer_scale": (ConvLayerScale, lambda n: torch.randn(n, 2, 5, 5, dtype=torch.float64), 1, 0),
    "tied_decoder": (TiedDecoder, lambda n: torch.randint(0, 7, (n, 4)), 1, 0),
    "scaled_weight": (ScaledWeight, lambda n: torch.randn(n, 2, 5, 5, dtype=torch.float64), 1, 0),
    "in_place_scale": (InPlaceScale, lambda n: torch.randn(n, 4, dtype=torch.float64), 0, 1),
    "sliced_positions": (SlicedPositions, lambda n: torch.randn(n, 4, 4, dtype=torch.float64), 1, 0),
    "two_ops_one_parameter": (TwoOpsOneParameter, lambda n: torch.randn(n, 4, dtype=torch.float64), 1, 0),
}


def _owners(model, x):
    engine = GramEngine(model, full=False, selected=[0], backend="torch", memory_budget=1 << 30, conv_form="auto")
    engine.term_bytes = 1 << 24
    engine.probe(x)
    engine._record(x)  # the real pass may hand groups back too
    ops = [m for m in engine.owners if isinstance(m, ParameterOp)]
    generic = [m for m in engine.owners if engine.rule(m) is generic_rule]
    covered = sorted(id(p) for params in engine.owners.values() for p in params.values())
    return ops, generic, covered


@pytest.mark.parametrize("name", list(CASES))
def test_ownership(name):
    factory, inputs, n_ops, n_generic = CASES[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    ops, generic, covered = _owners(model, inputs(5))
    assert len(ops) == n_ops
    assert len(generic) == n_generic
    # every trainable parameter exactly once
    assert covered == sorted(id(p) for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_trace_matches_loop_reference(name, dtype):
    factory, inputs, _, _ = CASES[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    x = inputs(5)
    J = loop_jacobian(model, x.double() if x.is_floating_point() else x)
    reference = torch.einsum("iap,jap->ij", J, J)
    K = ft.ntk_gram(model.to(dtype), x.to(dtype) if x.is_floating_point() else x)
    assert ((K.double() - reference).norm() / reference.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("name", ["tokens", "tied_decoder", "two_ops_one_parameter"])
def test_cross_full_and_one_output(name):
    factory, inputs, _, _ = CASES[name]
    torch.manual_seed(1)
    model = factory().double().eval()
    x1, x2 = inputs(4), inputs(3)
    J1, J2 = loop_jacobian(model, x1), loop_jacobian(model, x2)
    full = torch.einsum("iap,jbp->ijab", J1, J2)
    assert torch.allclose(ft.ntk_gram(model, x1, x2, outputs="full"), full, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ft.ntk_gram(model, x1, x2), full.diagonal(dim1=2, dim2=3).sum(-1), rtol=1e-10, atol=1e-12)
    assert torch.allclose(ft.ntk_gram(model, x1, outputs=1), J1[:, 1] @ J1[:, 1].T, rtol=1e-10, atol=1e-12)


def test_blocks_and_small_chunks_agree():
    """Several blocks, and a budget that makes the expand op's per-example vjp run in chunks."""
    torch.manual_seed(2)
    model = TokenModel().double().eval()
    x = torch.randn(9, 3, 4, dtype=torch.float64)
    J = loop_jacobian(model, x)
    reference = torch.einsum("iap,jap->ij", J, J)
    for kwargs in ({"block_size": 4}, {"memory_budget": 1 << 16}):
        K = ft.ntk_gram(model, x, **kwargs)
        assert ((K - reference).norm() / reference.norm()).item() < 1e-10, kwargs


def test_model_unchanged_and_trainable_after():
    """The stand-in owners hold the model's own parameters; the model keeps them."""
    torch.manual_seed(3)
    model = TokenModel().double().eval()
    before = {name: p for name, p in model.named_parameters()}
    ft.ntk_gram(model, torch.randn(3, 3, 4, dtype=torch.float64))
    after = dict(model.named_parameters())
    assert all(after[name] is p and isinstance(p, nn.Parameter) for name, p in before.items())
    model(torch.randn(2, 3, 4, dtype=torch.float64)).sum().backward()
    assert model.class_token.grad is not None and model.pos.grad is not None


# ---------------------------------------------------------------------------------------
# Regressions found in review: each model, with the calls that went wrong.

class GatedSubBatch(nn.Module):
    """An op on the examples whose first feature is positive (all of them in one block, a
    part in another): the owners change after the first block, so the Gram starts over."""

    def __init__(self):
        super().__init__()
        self.inner, self.p, self.head = nn.Linear(4, 5), nn.Parameter(torch.randn(5)), nn.Linear(5, 3)

    def forward(self, x):
        h = self.inner(x)
        on = (x[:, 0] > 0).nonzero().squeeze(1)
        return self.head(torch.tanh(h.index_add(0, on, h[on] * self.p - h[on])))


class DataDependentLoop(nn.Module):
    """An op called more often on the block than on the probe's example, with a (T, d) table
    (T = n in the test): the table must not be taken for per-example data."""

    def __init__(self, T=5):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 3), nn.Linear(3 * T, 3)
        self.register_buffer("table", torch.randn(T, 3))
        self.p = nn.Parameter(torch.randn(3))

    def forward(self, x):  # (n, T, 4)
        h = torch.tanh(self.inner(x))
        steps = 1 + (x[:, 0, 0] > 0).long()
        for i in range(int(steps.max())):
            h = torch.where((i < steps)[:, None, None], torch.tanh(torch.addcmul(h, self.table, self.p)), h)
        return self.head(h.flatten(1))


class MixedLayoutOp(nn.Module):
    """One op with a batch-first and a time-first argument: slicing one example fails."""

    def __init__(self):
        super().__init__()
        self.inner, self.p, self.head = nn.Linear(4, 5), nn.Parameter(torch.randn(5)), nn.Linear(3, 3)

    def forward(self, x):  # (n, 3, 4)
        h = self.inner(x)
        return self.head(torch.tanh(torch.einsum("ntd,tnd,d->nt", h, h.transpose(0, 1), self.p)))


class InputOverwrittenLater(nn.Module):
    """The op's input is modified in place after the op (which autograd allows for an add):
    its recorded value is lost, so the op goes back to its module."""

    def __init__(self):
        super().__init__()
        self.inner, self.p, self.head = nn.Linear(4, 5), nn.Parameter(torch.randn(5)), nn.Linear(10, 3)

    def forward(self, x):
        h = self.inner(x) + 0.5
        y = torch.sin(h + self.p)
        h.mul_(2)
        return self.head(torch.cat([y, h], 1))


class ParameterAloneScale(nn.Module):
    """softplus of a (1, d) parameter alone: leading size 1 for any n."""

    def __init__(self):
        super().__init__()
        self.inner, self.s, self.head = nn.Linear(4, 5), nn.Parameter(torch.randn(1, 5)), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x) * F.softplus(self.s)))


def _gated_inputs():
    x = torch.randn(6, 4, dtype=torch.float64)
    x[:3, 0] = x[:3, 0].abs()  # the first block of 3: every example gated on
    x[3:, 0] = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    return x


def _loop_inputs():
    x = torch.randn(5, 5, 4, dtype=torch.float64)  # n = T = 5
    x[0, 0, 0] = -1.0  # the probe's example takes one step, the others two
    x[1:, 0, 0] = x[1:, 0, 0].abs()
    return x


REGRESSIONS = {
    "gated_sub_batch": (GatedSubBatch, _gated_inputs),
    "data_dependent_loop": (DataDependentLoop, _loop_inputs),
    "mixed_layout_op": (MixedLayoutOp, lambda: torch.randn(5, 3, 4, dtype=torch.float64)),
    "input_overwritten_later": (InputOverwrittenLater, lambda: torch.randn(5, 4, dtype=torch.float64)),
    "prelu_n_equals_c": (lambda: nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3)),
                         lambda: torch.randn(3, 4, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regressions(name):
    factory, inputs = REGRESSIONS[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    x = inputs()
    J = loop_jacobian(model, x)
    full = torch.einsum("iap,jbp->ijab", J, J)
    trace = full.diagonal(dim1=2, dim2=3).sum(-1)
    assert torch.allclose(ft.ntk_gram(model, x), trace, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ft.ntk_gram(model, x, outputs="full"), full, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ft.ntk_gram(model, x, outputs="full", block_size=3), full, rtol=1e-10, atol=1e-12)
    split = x.shape[0] // 2
    assert torch.allclose(ft.ntk_gram(model, x[:split], x[split:], outputs="full"), full[:split, split:],
                          rtol=1e-10, atol=1e-12)


def test_one_example_against_many():
    """x1 of one example cannot show that the op's result is shared by the batch; x2 can."""
    torch.manual_seed(0)
    model = ParameterAloneScale().double().eval()
    x1, x2 = torch.randn(1, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    J1, J2 = loop_jacobian(model, x1), loop_jacobian(model, x2)
    full = torch.einsum("iap,jbp->ijab", J1, J2)
    assert torch.allclose(ft.ntk_gram(model, x1, x2, outputs="full"), full, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ft.ntk_gram(model, x1, x2), full.diagonal(dim1=2, dim2=3).sum(-1), rtol=1e-10, atol=1e-12)


class StraightThrough(torch.autograd.Function):
    """sign(x) forward, identity backward: a use of its input the op router cannot see."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        return g


class OpAndFunction(nn.Module):
    """p in a plain op and inside an autograd.Function: the op alone does not cover p."""

    def __init__(self):
        super().__init__()
        self.inner, self.p, self.head = nn.Linear(4, 5), nn.Parameter(torch.randn(5)), nn.Linear(10, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        return self.head(torch.cat([torch.sin(h * self.p), h * StraightThrough.apply(self.p)], dim=1))


class FunctionOnly(nn.Module):
    """q only inside an autograd.Function, next to a parameter used plainly."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.p, self.q = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x) * self.p + StraightThrough.apply(self.q)))


class HookedOpOutput(nn.Module):
    """A gradient hook on the op's result changes what reaches p."""

    def __init__(self):
        super().__init__()
        self.inner, self.p, self.head = nn.Linear(4, 5), nn.Parameter(torch.randn(5)), nn.Linear(5, 3)

    def forward(self, x):
        y = self.inner(x) * self.p
        if y.requires_grad:
            y.register_hook(lambda g: -2 * g)
        return self.head(torch.tanh(y))


class TimeFirstOp(nn.Module):
    """The op's per-example argument is time-first: the op goes back to its module."""

    def __init__(self):
        super().__init__()
        self.inner, self.W, self.head = nn.Linear(4, 5), nn.Parameter(torch.randn(5, 3)), nn.Linear(3, 2)

    def forward(self, x):  # (n, T, 4)
        h = torch.tanh(self.inner(x)).transpose(0, 1)
        return self.head(torch.tanh(torch.einsum("tnd,de->nte", h, self.W)).mean(1))


REGRESSIONS.update({
    "op_and_autograd_function": (OpAndFunction, lambda: torch.randn(5, 4, dtype=torch.float64)),
    "autograd_function_only": (FunctionOnly, lambda: torch.randn(5, 4, dtype=torch.float64)),
    "hooked_op_output": (HookedOpOutput, lambda: torch.randn(5, 4, dtype=torch.float64)),
    "time_first_op": (TimeFirstOp, lambda: torch.randn(5, 3, 4, dtype=torch.float64)),
})


def test_time_first_op_is_not_owned_by_the_op():
    torch.manual_seed(0)
    model = TimeFirstOp().double().eval()
    ops, generic, _ = _owners(model, torch.randn(5, 3, 4, dtype=torch.float64))
    assert not ops and len(generic) == 1


# ---------------------------------------------------------------------------------------
# Closed forms: +, -, *, expand and dense ops (x @ w, w @ x, F.linear) on bare parameters
# take exact formulas instead of a vmap per op and output; dense groups take a factored term.

class BareOps(nn.Module):
    """Hand-written layers on bare parameters, every closed form at least once: a sequence
    through x @ w + b, a square weight used as x @ w and as w @ x (two orientations of the
    same parameter), F.linear with and without its bias, layer scales of two shapes, a
    parameter subtracted and added (a sign error would show) and an expanded token."""

    def __init__(self, d=4, tokens=3):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(5, d) / 2)
        self.b_in = nn.Parameter(torch.randn(d))
        self.square = nn.Parameter(torch.randn(d, d) / 2)
        self.gamma = nn.Parameter(torch.randn(d))
        self.time_scale = nn.Parameter(torch.randn(1, tokens, 1))
        self.shift = nn.Parameter(torch.randn(tokens, d))
        self.token = nn.Parameter(torch.randn(1, 1, d))
        self.w_out = nn.Parameter(torch.randn(3, d) / 2)
        self.b_out = nn.Parameter(torch.randn(3))
        self.w_aux = nn.Parameter(torch.randn(3, d) / 2)

    def forward(self, x):  # (n, T, 5) -> (n, 3)
        h = torch.tanh(x @ self.w_in + self.b_in)  # (n, T, d)
        h = h + self.gamma * torch.sin(h @ self.square)
        h = torch.tanh(self.square @ h.transpose(1, 2)).transpose(1, 2) * self.time_scale
        h = torch.cat([self.token.expand(h.shape[0], -1, -1), torch.tanh(h - self.shift) + torch.cos(self.shift + h)],
                      dim=1) * self.gamma
        pooled = h.mean(1)
        return F.linear(pooled, self.w_out, self.b_out) + 0.5 * F.linear(torch.cos(pooled), self.w_aux)


class BareMLP(nn.Module):
    """Dense layers as x @ w + b only: every group is a dense weight or an added bias."""

    def __init__(self, widths=(6, 8, 8, 3)):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(a, b) / a**0.5) for a, b in zip(widths, widths[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.randn(b)) for b in widths[1:])

    def forward(self, x):
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w + b
            x = torch.tanh(x) if i + 1 < len(self.weights) else x
        return x


class SharedWeightLinear(nn.Module):
    """One weight in F.linear with its bias and again without: two uses that differ, so each
    call's gradient is formed on its own and summed."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) / 2)
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w, self.b))
        return F.linear(h, self.w)[:, :3]


CLOSED_FORMS = {
    "bare_ops": (BareOps, lambda n: torch.randn(n, 3, 5, dtype=torch.float64)),
    "bare_mlp": (BareMLP, lambda n: torch.randn(n, 6, dtype=torch.float64)),
    "shared_weight_linear": (SharedWeightLinear, lambda n: torch.randn(n, 4, dtype=torch.float64)),
}


@pytest.fixture
def no_vjp(monkeypatch):
    """Make the vjp routes of the op rule fail: the closed forms must carry the model."""
    import fasttangent.gram.ops as ops

    def refuse(*args, **kwargs):
        raise AssertionError("a closed-form op went through a vjp")

    monkeypatch.setattr(ops, "per_example_grads", refuse)
    monkeypatch.setattr(ops, "_masked_rows", refuse)


@pytest.mark.parametrize("name", list(CLOSED_FORMS))
def test_closed_form_models_are_owned_by_their_ops(name):
    factory, inputs = CLOSED_FORMS[name]
    torch.manual_seed(4)
    ops, generic, covered = _owners(factory().double().eval(), inputs(5))
    assert ops and not generic


@pytest.mark.parametrize("conv_form", ["auto", "factored", "materialized"])
@pytest.mark.parametrize("name", list(CLOSED_FORMS))
def test_closed_forms_match_loop_reference(name, conv_form, no_vjp):
    factory, inputs = CLOSED_FORMS[name]
    torch.manual_seed(4)
    model = factory().double().eval()
    x1, x2 = inputs(5), inputs(3)
    J1, J2 = loop_jacobian(model, x1), loop_jacobian(model, x2)
    full = torch.einsum("iap,jbp->ijab", J1, J2)
    K = ft.ntk_gram(model, x1, x2, outputs="full", conv_form=conv_form)
    assert torch.allclose(K, full, rtol=1e-10, atol=1e-12)
    trace = torch.einsum("iap,jap->ij", J1, J1)
    assert torch.allclose(ft.ntk_gram(model, x1, conv_form=conv_form, block_size=2), trace, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ft.ntk_gram(model, x1, outputs=2, conv_form=conv_form), J1[:, 2] @ J1[:, 2].T,
                          rtol=1e-10, atol=1e-12)


def test_closed_forms_in_float32_against_float64():
    torch.manual_seed(5)
    model = BareOps().double().eval()
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    J = loop_jacobian(model, x)
    reference = torch.einsum("iap,jap->ij", J, J)
    K = ft.ntk_gram(model.float(), x.float())
    assert K.dtype == torch.float32
    assert ((K.double() - reference).norm() / reference.norm()).item() < 1e-5


def _planned_forms(model, x, owners_of_interest):
    engine = GramEngine(model, full=False, selected=[0], backend="torch", memory_budget=1 << 30, conv_form="auto")
    engine.probe(x)
    engine.plan(128, 128, 1)
    return [engine.forms.get(m) for m in engine.owners if owners_of_interest(m)]


def test_dense_groups_are_planned_like_linear_layers():
    """x @ w groups get the forms nn.Linear layers of the same sizes get (here factored for
    the 64 x 64 weights, materialized for the small head); the added biases get none."""
    torch.manual_seed(6)
    widths = (64, 64, 64, 3)
    x = torch.randn(4, 64, dtype=torch.float64)
    bare = _planned_forms(BareMLP(widths=widths).double(), x,
                          lambda m: isinstance(m, ParameterOp) and next(m.parameters()).dim() == 2)
    layers = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)).double()
    linear = _planned_forms(layers, x, lambda m: isinstance(m, nn.Linear))
    assert bare == linear and "factored" in bare
    biases = _planned_forms(BareMLP(widths=widths).double(), x,
                            lambda m: isinstance(m, ParameterOp) and next(m.parameters()).dim() == 1)
    assert biases == [None] * 3


# ---------------------------------------------------------------------------------------
# Shared tensors: results of ops on a group's parameters without the examples (a sliced
# position table, nanoGPT's wpe(arange(T)), a rescaled weight) belong to the group; the ops
# combining them with the examples are its ops, differentiated through the shared tensor.

class PositionsByEmbedding(nn.Module):
    """nanoGPT's embeddings: tokens by wte(idx), positions by wpe(arange(T)), no examples in
    the second; then a sliced table and a transposed weight (pos[:T], w.T), also shared."""

    def __init__(self, vocab=9, block=6, d=5):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.table = nn.Parameter(torch.randn(block, d))
        self.mix = nn.Parameter(torch.randn(d, d) / 2)
        self.head = nn.Linear(d, 3)

    def forward(self, idx):  # (n, T) -> (n, 3)
        T = idx.shape[1]
        h = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        h = torch.tanh(h) * self.table[:T]
        h = torch.tanh(h @ self.mix.T)
        return self.head(h.mean(1))


class ManualWeightNorm(nn.Module):
    """w / ‖w‖ · g computed in the forward, then used by F.linear: a shared tensor as weight."""

    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(6, 4))
        self.g = nn.Parameter(torch.randn(6, 1))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        w = self.v / self.v.norm(dim=1, keepdim=True) * self.g
        return self.head(torch.tanh(F.linear(x, w)))


class Opaque(torch.autograd.Function):
    """A function the TorchFunctionMode cannot look into (its result is not tracked)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class SharedIntoOpaque(nn.Module):
    """A shared tensor used inside an autograd.Function: a use no op shows (graph check)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 3)
        self.pos = nn.Parameter(torch.randn(5, 3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # (n, T, 4), T <= 5
        table = self.pos[:x.shape[1]]
        h = torch.tanh(self.inner(x) + table) + Opaque.apply(table)
        return self.head(h.mean(1))


@torch.jit.script
def _scripted_double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


class ExamplesThroughScript(nn.Module):
    """Examples coming out of TorchScript are not tracked (the mode sees no op there): the op
    on them looks shared on one example and grows with the batch on more, so the group
    goes back to the model."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y = self.inner(x)
        h = _scripted_double(torch.tanh(y))
        return self.head(torch.sin(h * self.scale) + y * self.scale)


class JoinedGroups(nn.Module):
    """A shared tensor of one group combined with another group's parameter, no examples:
    the two groups are joined into one."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 3)
        self.a = nn.Parameter(torch.randn(1, 3))
        self.b = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x) * (self.a.exp() + self.b)))


class LearnedMemory(nn.Module):
    """Keys and values learned and broadcast over the batch (leading size 1, as one example's
    in a block of one): attention has no closed form, so the vjp route must not take the
    shared slices for per-example arguments. A mask token chosen per position, likewise."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.randn(1, 5, 4))
        self.v = nn.Parameter(torch.randn(1, 5, 4))
        self.mask_token = nn.Parameter(torch.randn(1, 1, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (n, T, 4)
        x = torch.where(x[..., :1] > 0, self.mask_token * 2, x)
        h = F.scaled_dot_product_attention(x, self.k[:, :4], self.v[:, :4])
        return self.head(h.mean(1))


SHARED = {
    # name: (factory, inputs, ParameterOp owners expected, generic owners expected)
    "positions_by_embedding": (PositionsByEmbedding, lambda n: torch.randint(0, 9, (n, 4)), 4, 0),
    "manual_weight_norm": (ManualWeightNorm, lambda n: torch.randn(n, 4, dtype=torch.float64), 1, 0),
    "shared_into_opaque": (SharedIntoOpaque, lambda n: torch.randn(n, 4, 4, dtype=torch.float64), 0, 1),
    "examples_through_script": (ExamplesThroughScript, lambda n: torch.randn(n, 4, dtype=torch.float64), 0, 1),
    "joined_groups": (JoinedGroups, lambda n: torch.randn(n, 4, dtype=torch.float64), 1, 0),
    "learned_memory": (LearnedMemory, lambda n: torch.randn(n, 3, 4, dtype=torch.float64), 2, 0),
}


@pytest.mark.parametrize("name", list(SHARED))
def test_shared_tensors_ownership(name):
    factory, inputs, n_ops, n_generic = SHARED[name]
    torch.manual_seed(7)
    model = factory().double().eval()
    ops, generic, covered = _owners(model, inputs(5))
    assert (len(ops), len(generic)) == (n_ops, n_generic)
    assert covered == sorted(id(p) for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(SHARED))
def test_shared_tensors_match_loop_reference(name):
    factory, inputs = SHARED[name][:2]
    torch.manual_seed(7)
    model = factory().double().eval()
    x1, x2 = inputs(4), inputs(3)  # n = 4 = T: a table's length equals the block's
    J1, J2 = loop_jacobian(model, x1), loop_jacobian(model, x2)
    full = torch.einsum("iap,jbp->ijab", J1, J2)
    assert torch.allclose(ft.ntk_gram(model, x1, x2, outputs="full"), full, rtol=1e-10, atol=1e-12)
    trace = torch.einsum("iap,jap->ij", J1, J1)
    for kwargs in ({}, {"block_size": 1}, {"block_size": 3}):  # blocks of one example, and a last one
        assert torch.allclose(ft.ntk_gram(model, x1, **kwargs), trace, rtol=1e-10, atol=1e-12), kwargs


def test_position_tables_take_closed_forms(no_vjp):
    """x + wpe(arange(T)) and h * table[:T]: the gradient through the shared tensor is the
    closed form pulled back through its tape, no vjp of the ops with the examples."""
    torch.manual_seed(8)

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.wpe = nn.Embedding(6, 5)
            self.table = nn.Parameter(torch.randn(6, 5))
            self.inner = nn.Linear(3, 5)
            self.head = nn.Linear(5, 2)

        def forward(self, x):  # (n, T, 3)
            T = x.shape[1]
            h = self.inner(x) + self.wpe(torch.arange(T))
            return self.head((torch.tanh(h) * self.table[:T]).mean(1))

    model = Positions().double().eval()
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    J = loop_jacobian(model, x)
    assert torch.allclose(ft.ntk_gram(model, x, outputs="full"), torch.einsum("iap,jbp->ijab", J, J),
                          rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["bare_ops", "shared_weight_linear", "positions_by_embedding", "manual_weight_norm",
                                  "learned_memory"])
def test_gpu_path_on_the_cpu(monkeypatch, name):
    """The GPU path (block passes, backward batched over output seeds), forced on CPU tensors."""
    monkeypatch.setattr(GramEngine, "backward_is_batched", lambda self, device: True)
    factory, inputs = {**CLOSED_FORMS, **{k: v[:2] for k, v in SHARED.items()}}[name]
    torch.manual_seed(9)
    model = factory().double().eval()
    x1, x2 = inputs(4), inputs(3)
    J1, J2 = loop_jacobian(model, x1), loop_jacobian(model, x2)
    full = torch.einsum("iap,jbp->ijab", J1, J2)
    assert torch.allclose(ft.ntk_gram(model, x1, x2, outputs="full"), full, rtol=1e-10, atol=1e-12)
    trace = torch.einsum("iap,jap->ij", J1, J1)
    assert torch.allclose(ft.ntk_gram(model, x1, block_size=3), trace, rtol=1e-10, atol=1e-12)


class Lookups(nn.Module):
    """Token embeddings by F.embedding: plain, with a padding row (given as -1), sparse
    gradients, and the same table looked up twice (the gradients add)."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Embedding(7, 3)
        self.padded = nn.Embedding(7, 3, padding_idx=-1)
        self.sparse = nn.Embedding(7, 3, sparse=True)
        self.head = nn.Linear(3, 2)

    def forward(self, idx):  # (n, T) integers in [0, 7)
        h = self.plain(idx) + self.padded(idx) * self.sparse(idx) + self.plain(idx.flip(1)) * 0.5
        return self.head(torch.tanh(h).mean(1))


def test_embeddings_take_closed_forms(no_vjp):
    torch.manual_seed(10)
    model = Lookups().double().eval()
    x1, x2 = torch.randint(0, 7, (4, 5)), torch.randint(0, 7, (3, 5))
    x1[0, :2] = 6  # the padding row (index -1 = 6), twice in one example
    ops, generic, _ = _owners(model, x1)
    assert len(ops) == 3 and not generic
    dense = copy.deepcopy(model)
    dense.sparse.sparse = False  # the reference reads dense gradients; the same function
    J1, J2 = loop_jacobian(dense, x1), loop_jacobian(dense, x2)
    assert torch.allclose(ft.ntk_gram(model, x1, x2, outputs="full"), torch.einsum("iap,jbp->ijab", J1, J2),
                          rtol=1e-10, atol=1e-12)
    assert torch.allclose(ft.ntk_gram(model, x1, block_size=3), torch.einsum("iap,jap->ij", J1, J1),
                          rtol=1e-10, atol=1e-12)


def test_embedding_with_max_norm_is_left_to_the_vjp():
    """max_norm renormalizes the table in place during the lookup: not a closed form."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Embedding(7, 3, max_norm=1.0), nn.Flatten(), nn.Linear(12, 2)).double().eval()
    x = torch.randint(0, 7, (4, 4))
    K = ft.ntk_gram(model, x)
    J = loop_jacobian(model, x)
    assert torch.allclose(K, torch.einsum("iap,jap->ij", J, J), rtol=1e-10, atol=1e-12)
