"""ft.ntk_gram against an independent float64 torch.func Jacobian contraction.

Reference: J (n, c, p) from vmap(jacrev) of a float64 copy of the model, then
K[i, j, a, b] = J1[i, a] · J2[j, b]. Every outputs mode, self and cross Grams.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import fasttangent as ft
from fasttangent.gram import PerExampleGrads, register_rule
from fasttangent.gram.cost import FACTORED, MATERIALIZED, PatchShape, choose_form
from fasttangent.gram.engine import GramEngine

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]
OUTPUT_MODES = ["trace", "full", 1]


def jacobian(model: nn.Module, x: torch.Tensor, output: int | None = None) -> torch.Tensor:
    """(n, c, p) float64 per-example Jacobian (or (n, 1, p) of one output)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def f(p, xi):
        out = functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)
        return out if output is None else out[output:output + 1]

    J = vmap(jacrev(f), (None, 0))(params, x)
    return torch.cat([v.reshape(x.shape[0], v.shape[1], -1) for v in J.values()], dim=2)


def reference_full(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(model).double()
    J1, J2 = jacobian(model, x1.double()), jacobian(model, x2.double())
    return torch.einsum("iap,jbp->ijab", J1, J2)


def select(full: torch.Tensor, outputs) -> torch.Tensor:
    if outputs == "trace":
        return full.diagonal(dim1=2, dim2=3).sum(-1)
    if outputs == "full":
        return full
    return full[:, :, outputs, outputs]


def rel_error(K: torch.Tensor, ref: torch.Tensor) -> float:
    return ((K.double() - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------
# Models (built deterministically; lazily sized layers are materialized on a dummy batch).

class Scale(nn.Module):
    """A custom layer with its own parameters (no registered rule: generic torch.func)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.w) + self.b * x**2


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN + identity, with in-place ops like torchvision's BasicBlock."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class SharedMLP(nn.Module):
    """One Linear called twice (weight sharing) plus a custom-parameter layer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.scale = Scale(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = self.scale(torch.tanh(self.shared(h)))
        return self.out(h)


class Attention(nn.Module):
    """nn.MultiheadAttention uses out_proj's weight without calling out_proj."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h)
        return self.head(a.mean(dim=1))


class Tied(nn.Module):
    """Two Linear modules sharing one weight tensor (tied weights)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class SharedPath(nn.Module):
    """One Linear reached by two attribute paths (``second = first``), called twice."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = self.first
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


class OutsideUses(nn.Module):
    """Parameters used outside their own module's call: a decoder tied to an embedding
    through ``F.linear(h, embedding.weight)``, a parent adding a conv's bias once more, and
    a Linear's weight used again by the parent."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.conv = nn.Conv1d(4, 4, 2)
        self.lin = nn.Linear(4, 4)

    def forward(self, tokens):
        h = self.embedding(tokens).transpose(1, 2)                      # (n, 4, T)
        h = torch.tanh(self.conv(h) + self.conv.bias[:, None]).mean(dim=2)
        h = torch.tanh(self.lin(h) + h @ self.lin.weight.T)
        return F.linear(h, self.embedding.weight)[:, :3]               # tied decoder


def _old_style_norms():
    """nn.utils.weight_norm / spectral_norm (a forward pre-hook computes the weight from
    weight_g, weight_v / weight_orig) and a user forward hook that changes an output."""
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(5, 6)), nn.Tanh(),
                          nn.utils.spectral_norm(nn.Linear(6, 6)), nn.Tanh(), nn.Linear(6, 3))
    model[4].register_forward_hook(lambda module, args, out: 2 * out + 0.5 * out ** 2)
    return model, (5,)


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)), (5,)


def _cnn2d():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, dilation=2, padding=2, groups=2, padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(6, 6, (2, 3), stride=(1, 2), groups=6, bias=False), nn.ReLU(),
        nn.Flatten(), nn.LazyLinear(3)), (3, 9, 9)


def _cnn1d():
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv1d(4, 4, 3, dilation=2, padding="same", groups=2), nn.ReLU(),
        nn.Conv1d(4, 3, 2, padding=1, padding_mode="circular"),
        nn.Flatten(), nn.LazyLinear(3)), (2, 11)


def _residual_bn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Residual(4),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3), nn.BatchNorm1d(3)), (2, 6, 6)


def _norms():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(1, 2),  # (n, 16, 3)
                         nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3),
                         nn.LayerNorm([16, 3]), nn.Flatten(), nn.Linear(48, 3)), (2, 6, 5)


def _sequence():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Flatten(), nn.Linear(15, 3)), (5, 4)


MODELS = {
    "mlp": _mlp, "cnn2d": _cnn2d, "cnn1d": _cnn1d, "residual_bn": _residual_bn, "norms": _norms,
    "sequence_linear": _sequence, "shared_and_custom": lambda: (SharedMLP(), (5,)),
    "attention": lambda: (Attention(), (4, 3)), "tied": lambda: (Tied(), (4,)),
    "shared_path": lambda: (SharedPath(), (4,)), "old_style_norms": _old_style_norms,
}


@functools.lru_cache(maxsize=None)
def case(name: str):
    """(model in eval mode, x1 (5, ...), x2 (3, ...), reference full cross, reference full self)."""
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    with torch.no_grad():
        model.train()
        for _ in range(3):  # give BatchNorm non-trivial running statistics
            model(torch.randn(8, *shape))
    model.eval()
    x1, x2 = torch.randn(5, *shape), torch.randn(3, *shape)
    return model, x1, x2, reference_full(model, x1, x2), reference_full(model, x1, x1)


def test_parameters_used_outside_their_module_are_counted():
    """Every use of a parameter counts, also outside its own module's call (the structured
    rules would see only the uses inside it), in every outputs mode, self and cross."""
    torch.manual_seed(0)
    model = OutsideUses().double().eval()
    x1, x2 = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (3, 3))
    J1, J2 = jacobian(model, x1), jacobian(model, x2)  # integer tokens: not cast like reference_full
    ref_cross, ref_self = torch.einsum("iap,jbp->ijab", J1, J2), torch.einsum("iap,jbp->ijab", J1, J1)
    for outputs in OUTPUT_MODES:
        assert rel_error(ft.ntk_gram(model, x1, x2, outputs=outputs), select(ref_cross, outputs)) < 1e-10
        assert rel_error(ft.ntk_gram(model, x1, outputs=outputs), select(ref_self, outputs)) < 1e-10


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("outputs", OUTPUT_MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_jacobian_reference(name, outputs, dtype):
    model, x1, x2, ref_cross, ref_self = case(name)
    model = copy.deepcopy(model).to(dtype)
    K_cross = ft.ntk_gram(model, x1.to(dtype), x2.to(dtype), outputs=outputs)
    K_self = ft.ntk_gram(model, x1.to(dtype), outputs=outputs)
    assert K_cross.dtype == dtype and K_self.dtype == dtype
    assert rel_error(K_cross, select(ref_cross, outputs)) < TOLERANCE[dtype]
    assert rel_error(K_self, select(ref_self, outputs)) < TOLERANCE[dtype]


@pytest.mark.parametrize("name", ["tied", "shared_path", "shared_and_custom"])
def test_shared_weights_leave_the_model_intact(name):
    """The parameters of a model with shared weights or a submodule reached by two paths
    are the same nn.Parameter objects after the Gram (torch's functional_call can leave plain
    tensors in their place, pytorch/pytorch#164759), and the Gram stays exact."""
    model, x1, _, _, ref_self = case(name)
    model = copy.deepcopy(model)
    before = {id(p) for p in model.parameters()}
    K = ft.ntk_gram(model, x1)
    slots = [t for m in model.modules() for t in m._parameters.values() if t is not None]
    assert all(isinstance(t, nn.Parameter) for t in slots) and {id(t) for t in slots} == before
    assert rel_error(K, select(ref_self, "trace")) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["cnn2d", "residual_bn", "shared_and_custom"])
def test_small_blocks(name, dtype):
    """block_size=2 with n1 = 5 (odd) and n2 = 3: several block pairs, ragged last blocks."""
    model, x1, x2, ref_cross, ref_self = case(name)
    model = copy.deepcopy(model).to(dtype)
    for outputs in OUTPUT_MODES:
        K_cross = ft.ntk_gram(model, x1.to(dtype), x2.to(dtype), outputs=outputs, block_size=2)
        K_self = ft.ntk_gram(model, x1.to(dtype), outputs=outputs, block_size=2)
        assert rel_error(K_cross, select(ref_cross, outputs)) < TOLERANCE[dtype]
        assert rel_error(K_self, select(ref_self, outputs)) < TOLERANCE[dtype]


@pytest.mark.parametrize("outputs", OUTPUT_MODES)
def test_tiny_memory_budget_picks_blocks_and_stays_exact(outputs):
    """A budget of a few examples: several blocks, outputs streamed in chunks."""
    model, x1, x2, ref_cross, ref_self = case("cnn2d")
    K = ft.ntk_gram(model, x1, x2, outputs=outputs, memory_budget=20_000)
    assert rel_error(K, select(ref_cross, outputs)) < TOLERANCE[torch.float32]
    K = ft.ntk_gram(model, x1, outputs=outputs, memory_budget=20_000)
    assert rel_error(K, select(ref_self, outputs)) < TOLERANCE[torch.float32]


def test_mean_reduce_is_trace_over_c():
    model, x1, x2, ref_cross, _ = case("mlp")
    K = ft.ntk_gram(model, x1, x2, reduce="mean")
    assert rel_error(K, select(ref_cross, "trace") / 3) < TOLERANCE[torch.float32]


def test_scalar_output_counts_as_one_output():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
    x = torch.randn(4, 3)
    ref = reference_full(model, x, x)
    assert ft.ntk_gram(model, x, outputs="full").shape == (4, 4, 1, 1)
    assert rel_error(ft.ntk_gram(model, x), select(ref, "trace")) < TOLERANCE[torch.float32]


def test_frozen_parameters_are_excluded():
    model, x1, x2, _, _ = case("mlp")
    model = copy.deepcopy(model)
    model[0].requires_grad_(False)
    ref = reference_full(model, x1, x2)
    assert rel_error(ft.ntk_gram(model, x1, x2, outputs="full"), ref) < TOLERANCE[torch.float32]


def test_user_registered_rule_is_used():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * self.gain

    used = []

    def gain_rule(ctx):
        used.append(True)
        grads = sum(call.cotangents[0] * call.inputs[0].unsqueeze(1) for call in ctx.calls)
        return [PerExampleGrads(grads)]

    register_rule(Gain, gain_rule)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), Gain(), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    K = ft.ntk_gram(model, x, outputs="full")
    assert used
    assert rel_error(K, reference_full(model, x, x)) < TOLERANCE[torch.float32]


# ------------------------------------------------------------------------------------
# The convolution cost model.

def test_cost_model_prefers_each_form_where_it_is_cheaper():
    first_cifar_conv = PatchShape(positions=1024, d_in=27, d_out=32)
    deep_conv_on_small_map = PatchShape(positions=4, d_in=4608, d_out=512)
    assert choose_form(first_cifar_conv, 128, 128, 10, full=False, budget_elements=1e9) == MATERIALIZED
    assert choose_form(deep_conv_on_small_map, 2, 2, 10, full=False, budget_elements=1e9) == FACTORED
    # cheaper in MACs but over the memory budget (2 n² T² pair temporaries): not taken
    small_map = PatchShape(positions=4, d_in=128, d_out=128)
    assert choose_form(small_map, 20000, 20000, 10, full=False, budget_elements=1e11) == FACTORED
    assert choose_form(small_map, 20000, 20000, 10, full=False, budget_elements=1e10) == MATERIALIZED


def _two_regime_cnn():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),       # T = 256, tiny weight
                         nn.AvgPool2d(8), nn.Conv2d(2, 256, 2), nn.ReLU(),  # T = 1, large weight
                         nn.Flatten(), nn.Linear(256, 2)).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_both_conv_forms_are_chosen_and_agree(dtype):
    model = _two_regime_cnn().to(dtype)
    x1, x2 = torch.randn(3, 1, 16, 16, dtype=dtype), torch.randn(2, 1, 16, 16, dtype=dtype)
    engine = GramEngine(model, full=False, selected=[0, 1], backend="auto", memory_budget=1 << 30,
                        conv_form="auto")
    engine.probe(x1)
    engine.plan(64, 64, 2)  # a realistic block: at n = 3 every form's fixed cost dominates
    conv_forms = {type(m).__name__ + str(i): form for i, (m, form) in enumerate(engine.forms.items())
                  if isinstance(m, nn.Conv2d)}
    assert sorted(conv_forms.values()) == [FACTORED, MATERIALIZED]
    ref = reference_full(model, x1, x2)
    for outputs in OUTPUT_MODES:
        results = [ft.ntk_gram(model, x1, x2, outputs=outputs, conv_form=form)
                   for form in ("auto", FACTORED, MATERIALIZED)]
        for K in results:
            assert rel_error(K, select(ref, outputs)) < TOLERANCE[dtype]


# ------------------------------------------------------------------------------------
# torchvision ResNet18 (BatchNorm in eval, in-place ReLU and residual adds).

@pytest.mark.slow
def test_resnet18_matches_reference_one_output_at_a_time():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    K = ft.ntk_gram(model, x, outputs="full")
    model64 = copy.deepcopy(model).double()
    J = torch.cat([jacobian(model64, x.double(), output=k) for k in range(10)], dim=1)
    ref = torch.einsum("iap,jbp->ijab", J, J)
    assert rel_error(K, ref) < TOLERANCE[torch.float32]
    assert rel_error(ft.ntk_gram(model, x), select(ref, "trace")) < TOLERANCE[torch.float32]
    assert rel_error(ft.ntk_gram(model, x, outputs=7), select(ref, 7)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("batched", [True, False])
def test_batched_and_looped_backward_agree_with_reference(monkeypatch, batched):
    """The GPU path (vmap over output seeds) and the CPU path (loop) on the same CPU model."""
    monkeypatch.setattr(GramEngine, "backward_is_batched", lambda self, device: batched)
    model, x1, x2, ref_cross, ref_self = case("residual_bn")
    for outputs in OUTPUT_MODES:
        assert rel_error(ft.ntk_gram(model, x1, x2, outputs=outputs), select(ref_cross, outputs)) < 1e-5
        K = ft.ntk_gram(model, x1, outputs=outputs, memory_budget=30_000)
        assert rel_error(K, select(ref_self, outputs)) < 1e-5


@pytest.mark.parametrize("outputs", OUTPUT_MODES)
def test_works_under_no_grad_and_with_inputs_requiring_grad(outputs):
    model, x1, x2, ref_cross, ref_self = case("shared_and_custom")
    with torch.no_grad():
        K = ft.ntk_gram(model, x1, x2.clone().requires_grad_(True), outputs=outputs)
        K_self = ft.ntk_gram(model, x1, outputs=outputs)
    assert rel_error(K, select(ref_cross, outputs)) < TOLERANCE[torch.float32]
    assert rel_error(K_self, select(ref_self, outputs)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("outputs", ["trace", 1])
def test_materialized_conv_split_into_input_channel_pieces_stays_exact(outputs):
    """A tiny budget splits each materialized conv weight into per-input-channel pieces
    (streamed one at a time); the Gram is still the sum over all parameters."""
    model, x1, x2, ref_cross, ref_self = case("cnn2d")
    K = ft.ntk_gram(model, x1, outputs=outputs, conv_form="materialized", memory_budget=20_000)
    assert rel_error(K, select(ref_self, outputs)) < TOLERANCE[torch.float32]
    K = ft.ntk_gram(model, x1, x2, outputs=outputs, conv_form="materialized", memory_budget=20_000)
    assert rel_error(K, select(ref_cross, outputs)) < TOLERANCE[torch.float32]


def test_gram_carries_no_autograd_history():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    K = ft.ntk_gram(model, torch.randn(3, 4))
    assert not K.requires_grad and K.grad_fn is None


# ------------------------------------------------------------------------------------
# The one-pass path (CPU: one backward pass per output, terms built in hooks) and the
# ways of building an ungrouped convolution's per-example weight gradients.

class CountBackward(torch.autograd.Function):
    """Identity that counts the backward passes running through it."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        CountBackward.calls += 1
        return g


class CountingHead(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return CountBackward.apply(self.body(x))


def _ungrouped_geometry_cnn():
    """Ungrouped convolutions in every geometry the weight-gradient paths must reproduce."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(3, 4, 3, dilation=2, padding=2, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(4, 3, (2, 3), padding="same", padding_mode="replicate", bias=False), nn.Tanh(),
        nn.Flatten(2), nn.Conv1d(3, 2, 3, stride=2, padding=1, padding_mode="circular"),
        nn.Flatten(), nn.LazyLinear(3)), (2, 9, 8)


@pytest.mark.parametrize("way", ["weight_gradient_convolution", "patch_row_pieces"])
@pytest.mark.parametrize("name", ["cnn2d", "cnn1d", "ungrouped_geometry"])
def test_conv_weight_gradient_ways_match_reference(monkeypatch, name, way):
    """Both ways of building ungrouped conv weight gradients (chosen by map size on CPU),
    forced on every layer, with the default budget and with a tiny one (many output-channel,
    input-channel and example pieces)."""
    from fasttangent.gram import rules
    monkeypatch.setattr(rules, "BACKWARD_WEIGHT_MIN_POSITIONS", 1 if way == "weight_gradient_convolution" else 10**9)
    torch.manual_seed(5)
    if name == "ungrouped_geometry":
        model, shape = _ungrouped_geometry_cnn()
        x1, x2 = torch.randn(5, *shape), torch.randn(3, *shape)
        model(x1)
        model.eval()
        ref_cross, ref_self = reference_full(model, x1, x2), reference_full(model, x1, x1)
    else:
        model, x1, x2, ref_cross, ref_self = case(name)
    for budget in (None, 6_000):
        for outputs in ("trace", 2):
            K = ft.ntk_gram(model, x1, x2, outputs=outputs, conv_form="materialized", memory_budget=budget)
            assert rel_error(K, select(ref_cross, outputs)) < TOLERANCE[torch.float32]
            K = ft.ntk_gram(model, x1, outputs=outputs, conv_form="materialized", memory_budget=budget)
            assert rel_error(K, select(ref_self, outputs)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("outputs,passes", [("trace", 3), (1, 1)])
def test_one_pass_runs_one_backward_pass_per_output(outputs, passes):
    """On CPU with every example in one block, the upper layers are differentiated once
    per output (not once per group of layers), for self and cross Grams alike."""
    model, x1, x2, ref_cross, ref_self = case("cnn2d")
    counted = CountingHead(model)
    for x_other, ref in ((None, ref_self), (x2, ref_cross)):
        CountBackward.calls = 0
        K = ft.ntk_gram(counted, x1, x_other, outputs=outputs)
        assert CountBackward.calls == passes
        assert rel_error(K, select(ref, outputs)) < TOLERANCE[torch.float32]


def test_sink_edges_are_the_lowest_recorded_outputs():
    from torch.autograd.graph import get_gradient_edge

    from fasttangent.gram.engine import _sink_edges
    torch.manual_seed(0)
    a, b, c, d = (nn.Linear(3, 3) for _ in range(4))
    x = torch.randn(2, 3)
    h_a = a(x)
    h_b, h_c = b(h_a.tanh()), c(h_a.tanh())  # two branches above a
    h_d = d(h_b + h_c)
    chain = [get_gradient_edge(t) for t in (h_d, h_b, h_c, h_a)]
    assert _sink_edges(chain) == [chain[3]]
    branches = [get_gradient_edge(t) for t in (h_d, h_b, h_c)]
    assert _sink_edges(branches) == branches[1:]


@pytest.mark.parametrize("block_size", [2, None])
def test_one_pass_blocks_cover_every_block_pair_once(monkeypatch, block_size):
    """When one pass over all examples does not fit, a symmetric Gram takes one pass per
    diagonal block and one per pair of blocks (B + B(B-1)/2), a cross Gram one per pair."""
    model, x1, x2, ref_cross, ref_self = case("cnn2d")
    sizes = []
    stream = GramEngine.stream_gram

    def counting(self, x, K, split=None):
        sizes.append((x.shape[0], split))
        return stream(self, x, K, split)

    monkeypatch.setattr(GramEngine, "stream_gram", counting)
    budget = None if block_size else 20_000  # None: block_size=2 decides; else the budget does
    K = ft.ntk_gram(model, x1, block_size=block_size, memory_budget=budget)
    assert rel_error(K, select(ref_self, "trace")) < TOLERANCE[torch.float32]
    diagonal = [size for size, split in sizes if split is None]
    pairs = [(split, size - split) for size, split in sizes if split is not None]
    B = len(diagonal)
    assert B > 1 and len(pairs) == B * (B - 1) // 2
    # every entry of K computed exactly once: diagonal blocks plus mirrored off-diagonal ones
    assert sum(d * d for d in diagonal) + 2 * sum(a * b for a, b in pairs) == x1.shape[0] ** 2
    sizes.clear()
    K = ft.ntk_gram(model, x1, x2, block_size=block_size, memory_budget=budget)
    assert rel_error(K, select(ref_cross, "trace")) < TOLERANCE[torch.float32]
    assert len(sizes) > 1 and all(split is not None for _, split in sizes)
    assert sum(split * (size - split) for size, split in sizes) == x1.shape[0] * x2.shape[0]


# ------------------------------------------------------------------------------------
# Models that exercise the probe and the one-pass planning (found in review).

class CosByGrad(nn.Module):
    """Uses torch.func.grad in its forward (d/dz Σ sin z = cos z), which refuses saved-tensor hooks."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.func.vmap(torch.func.grad(lambda z: torch.sin(z).sum()))(self.a(x)))


class CosPlain(CosByGrad):
    def forward(self, x):
        return self.b(torch.cos(self.a(x)))


def test_model_with_torch_func_in_its_forward():
    torch.manual_seed(0)
    model, x1, x2 = CosByGrad(), torch.randn(4, 3), torch.randn(3, 3)
    plain = CosPlain()
    plain.load_state_dict(model.state_dict())
    for outputs in OUTPUT_MODES:
        assert rel_error(ft.ntk_gram(model, x1, x2, outputs=outputs),
                         select(reference_full(plain, x1, x2), outputs)) < TOLERANCE[torch.float32]


class SparseProjection(nn.Module):
    def __init__(self, dense: bool = False):
        super().__init__()
        torch.manual_seed(1)
        P = torch.randn(4, 6)
        P[P.abs() < 0.7] = 0
        self.register_buffer("P", P if dense else P.to_sparse())
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        product = self.P @ x.T if self.P.layout == torch.strided else torch.sparse.mm(self.P, x.T)
        return self.lin(torch.tanh(product.T))


def test_model_with_a_sparse_buffer():
    model, dense = SparseProjection(), SparseProjection(dense=True)
    x = torch.randn(5, 6)
    assert rel_error(ft.ntk_gram(model, x), select(reference_full(dense, x, x), "trace")) < TOLERANCE[torch.float32]


class AuxiliaryOnly(nn.Module):
    """Trainable parameters only in a side branch that does not reach the output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 2).requires_grad_(False)
        self.aux = nn.Linear(3, 1)

    def forward(self, x):
        self.last_aux = self.aux(x)
        return self.body(x)


@pytest.mark.parametrize("outputs", OUTPUT_MODES)
def test_output_that_no_trainable_parameter_reaches_has_zero_gram(outputs):
    K = ft.ntk_gram(AuxiliaryOnly(), torch.randn(4, 3), outputs=outputs)
    assert K.abs().max() == 0


class DenseByHand(nn.Module):
    """A generic-rule layer with many parameters: its per-example gradients dominate memory."""

    def __init__(self, d):
        super().__init__()
        self.W = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x):
        return x @ self.W


def test_one_pass_plan_counts_generic_gradients_and_patches(monkeypatch):
    """Memory the passes hold beyond autograd's saved tensors: a generic-rule layer's
    per-example gradients (n × p) and unfolded patches are in the estimate, so a budget
    they would overflow splits the examples into blocks (and the result stays exact)."""
    torch.manual_seed(0)
    model = nn.Sequential(DenseByHand(128), nn.Tanh(), nn.Linear(128, 2))
    x = torch.randn(16, 128)
    engine = GramEngine(model, full=False, selected=[0, 1], backend="auto", memory_budget=1 << 30, conv_form="auto")
    engine.probe(x)
    engine.plan(16, 16, 1)
    assert engine.one_pass_bytes(16) >= 16 * 128 * 128 * 4
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    engine = GramEngine(conv, full=False, selected=[0], backend="auto", memory_budget=1 << 30, conv_form="factored")
    engine.probe(torch.randn(2, 3, 8, 8))
    engine.plan(10, 10, 1)
    assert engine.one_pass_bytes(10) >= 10 * 64 * 27 * 4  # the factored conv's patches
    passes = []
    stream = GramEngine.stream_gram
    monkeypatch.setattr(GramEngine, "stream_gram",
                        lambda self, x, K, split=None: passes.append(x.shape[0]) or stream(self, x, K, split))
    K = ft.ntk_gram(model, x, memory_budget=16 * 128 * 128 * 4)  # the gradients alone fill it
    assert len(passes) > 1
    assert rel_error(K, select(reference_full(model, x, x), "trace")) < TOLERANCE[torch.float32]


def test_parametrized_layers_weight_norm_and_orthogonal():
    """Parametrizations (torch.nn.utils.parametrize) own their originals through the
    parametrized module: the generic rule differentiates the module with the originals."""
    from torch.nn.utils.parametrizations import orthogonal, weight_norm
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 3)), nn.Tanh(), orthogonal(nn.Linear(3, 3)), nn.Tanh(),
                          nn.Linear(3, 2))
    x1, x2 = torch.randn(5, 4), torch.randn(3, 4)
    J1, J2 = jacobian(model, x1), jacobian(model, x2)  # integer tokens: not cast like reference_full
    ref_cross, ref_self = torch.einsum("iap,jbp->ijab", J1, J2), torch.einsum("iap,jbp->ijab", J1, J1)
    for outputs in OUTPUT_MODES:
        assert rel_error(ft.ntk_gram(model, x1, x2, outputs=outputs), select(ref_cross, outputs)) < 1e-5
        assert rel_error(ft.ntk_gram(model, x1, outputs=outputs), select(ref_self, outputs)) < 1e-5
    root = weight_norm(nn.Linear(4, 2))  # parametrized at the root of the model
    assert rel_error(ft.ntk_gram(root, x1), select(reference_full(root, x1, x1), "trace")) < 1e-5


def test_cost_model_counts_the_fixed_cost_of_each_group_term():
    """A depthwise conv with many groups on a tiny map: the factored form has one term per
    group and output, the materialized form one batched matmul, so materialized wins."""
    depthwise_on_1x1 = PatchShape(positions=1, d_in=25, d_out=1, groups=1152)
    assert choose_form(depthwise_on_1x1, 8, 8, 10, full=False, budget_elements=1e9) == MATERIALIZED
