"""Linearity metrics against independent references: hand-computed alignments, numpy CKA,
explicit functional forwards for ReLU statuses and representations, float64 torch.func Grams."""
import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import fasttangent as ft
from fasttangent.metrics import SignRecord, flatten_gram

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ------------------------------------------------------------------------------ references

def np_alignment(K1, K2, centered=False):
    """KA / CKA written out with numpy in float64: H K H with H = I − 11ᵀ/m."""
    K1, K2 = (np.asarray(torch.as_tensor(K).detach(), dtype=np.float64) for K in (K1, K2))
    if centered:
        H1 = np.eye(K1.shape[0]) - 1.0 / K1.shape[0]
        H2 = np.eye(K1.shape[1]) - 1.0 / K1.shape[1]
        K1, K2 = H1 @ K1 @ H2, H1 @ K2 @ H2
    return np.sum(K1 * K2) / (np.linalg.norm(K1) * np.linalg.norm(K2))


def jacobian_gram(model, x, outputs):
    """Empirical NTK in float64 from per-example Jacobians (torch.func.jacrev)."""
    model = copy.deepcopy(model).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def f(p, xi):
        return functional_call(model, (p, buffers), (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), (None, 0))(params, x.double())
    n = x.shape[0]
    J = torch.cat([j.reshape(n, j.shape[1], -1) for j in jac.values()], dim=-1)  # (n, c, p)
    full = torch.einsum("iap,jbp->ijab", J, J)
    if outputs == "full":
        return full
    if outputs == "trace":
        return full.diagonal(dim1=2, dim2=3).sum(-1)
    return full[:, :, outputs, outputs]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def assert_unchanged(model, before):
    state, flags = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == flags
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())


def perturbed(model, scale, seed=1):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return other


# ---------------------------------------------------------------------------------- models

class SharedReluMLP(nn.Module):
    """3 -> 7 -> 7 -> 2; one nn.ReLU module called twice."""

    def __init__(self, d_in=3, hidden=7, c=2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


def mlp_pre_activations(model, x):
    """The two ReLU inputs of SharedReluMLP, by an explicit functional forward."""
    z1 = F.linear(x, model.fc1.weight, model.fc1.bias)
    z2 = F.linear(F.relu(z1), model.fc2.weight, model.fc2.bias)
    return [z1, z2]


class SmallCNN(nn.Module):
    """(n, 2, 7, 7) -> conv 4 -> ReLU (in place) -> conv 3 stride 2 -> ReLU -> linear 2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(27, 2)

    def forward(self, x):
        h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(h.flatten(1))


def cnn_pre_activations(model, x):
    z1 = F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)
    z2 = F.conv2d(F.relu(z1), model.conv2.weight, model.conv2.bias, stride=2)
    return [z1, z2]


def hand_sign_similarity(pre_model, pre_ref):
    matches = sum(int(((a > 0) == (b > 0)).sum()) for a, b in zip(pre_model, pre_ref))
    return matches / sum(a.numel() for a in pre_model)


class FunctionalReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TanhMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class HeadDefinedFirst(nn.Module):
    """The output layer is defined before the body: 'last nn.Linear' must mean last *called*."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 2)
        self.body = nn.Linear(3, 5)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.head(self.act(self.body(x)))


def make(cls, dtype, seed=0):
    torch.manual_seed(seed)
    return cls().to(dtype)


# ------------------------------------------------------------------------ kernel alignment

@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_alignment_hand_computed(dtype):
    # <I, 11ᵀ> = 2, ‖I‖ = √2, ‖11ᵀ‖ = 2
    a = ft.kernel_alignment(torch.eye(2, dtype=dtype), torch.ones(2, 2, dtype=dtype))
    assert a.dim() == 0 and a.dtype == dtype
    assert float(a) == pytest.approx(1 / np.sqrt(2), abs=TOL[dtype])
    # diag(1,2,3) vs tridiagonal(1,2,1): <,> = 2+4+6 = 12, norms √14 and √(3·4 + 4·1) = 4
    K1 = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=dtype))
    K2 = torch.tensor([[2.0, 1, 0], [1, 2, 1], [0, 1, 2]], dtype=dtype)
    assert float(ft.kernel_alignment(K1, K2)) == pytest.approx(12 / (4 * np.sqrt(14)), abs=TOL[dtype])
    # centered: H diag(1,2,3) H vs H 11ᵀ H = 0 would be undefined; use K2 instead, by hand:
    # H K1 H = K1 - row/col means + mean; checked against the numpy formula below
    assert float(ft.kernel_alignment(K1, K2, centered=True)) == pytest.approx(
        np_alignment(K1, K2, centered=True), abs=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 6), (5, 8)])
def test_kernel_alignment_matches_numpy_cka(dtype, shape):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(shape[0], 4, generator=g), torch.randn(shape[1], 4, generator=g)
    K1 = (A @ B.T).to(dtype)
    K2 = (A @ B.T + 0.7 * torch.randn(shape, generator=g)).to(dtype)
    for centered in (False, True):
        a = ft.kernel_alignment(K1, K2, centered=centered)
        assert float(a) == pytest.approx(np_alignment(K1, K2, centered), abs=TOL[dtype])
    assert abs(np_alignment(K1, K2, True) - np_alignment(K1, K2, False)) > 1e-3  # centering matters here


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("centered", [False, True])
def test_kernel_alignment_scale_invariant_and_one_on_itself(dtype, centered):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(7, 3, generator=g, dtype=dtype)
    K1, K2 = A @ A.T, A @ A.T + torch.eye(7, dtype=dtype)
    base = float(ft.kernel_alignment(K1, K2, centered=centered))
    assert base < 1 - 1e-3
    assert float(ft.kernel_alignment(3.5 * K1, 0.02 * K2, centered=centered)) == pytest.approx(base, abs=TOL[dtype])
    assert float(ft.kernel_alignment(K1, 9.0 * K1, centered=centered)) == pytest.approx(1.0, abs=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_gram_flattened_over_example_output_pairs(dtype):
    g = torch.Generator().manual_seed(2)
    n, c, p = 4, 3, 10
    J1, J2 = torch.randn(n, c, p, generator=g, dtype=dtype), torch.randn(n, c, p, generator=g, dtype=dtype)
    full1, full2 = torch.einsum("iap,jbp->ijab", J1, J1), torch.einsum("iap,jbp->ijab", J2, J2)
    # stacked by example: row i·c + a is J(x_i)_a
    M1, M2 = J1.reshape(n * c, p) @ J1.reshape(n * c, p).T, J2.reshape(n * c, p) @ J2.reshape(n * c, p).T
    torch.testing.assert_close(flatten_gram(full1), M1)
    # centering is sensitive to the layout: a plain reshape of (n, n, c, c) would differ
    assert abs(np_alignment(full1.reshape(n * c, n * c), full2.reshape(n * c, n * c), True)
               - np_alignment(M1, M2, True)) > 1e-3
    for centered in (False, True):
        a = ft.kernel_alignment(full1, full2, centered=centered)
        assert float(a) == pytest.approx(np_alignment(M1, M2, centered), abs=TOL[dtype])


def test_kernel_alignment_errors():
    with pytest.raises(ValueError, match="different shapes.*same inputs"):
        ft.kernel_alignment(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="zero.*undefined"):
        ft.kernel_alignment(torch.eye(3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="after centering.*centered=False"):
        ft.kernel_alignment(torch.eye(3), torch.full((3, 3), 0.1), centered=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        ft.kernel_alignment(torch.eye(2), torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="2-d .* or 4-d"):
        ft.kernel_alignment(torch.ones(2, 2, 2), torch.ones(2, 2, 2))


# ---------------------------------------------------------------------------- sign similarity

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls, pre_activations, x_shape", [
    (SharedReluMLP, mlp_pre_activations, (40, 3)),
    (SmallCNN, cnn_pre_activations, (6, 2, 7, 7)),
])
def test_sign_similarity_matches_explicit_forward(dtype, cls, pre_activations, x_shape):
    model = make(cls, dtype)
    ref = perturbed(model, 0.3)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    model.train()
    model_before, ref_before = snapshot(model), snapshot(ref)

    expected = hand_sign_similarity(pre_activations(model, x), pre_activations(ref, x))
    assert 0.5 < expected < 1
    s = ft.sign_similarity(model, ref, x)
    assert s.dim() == 0 and float(s) == pytest.approx(expected, abs=1e-12)
    record = ft.record_signs(ref, x)
    assert float(ft.sign_similarity(model, record, x)) == pytest.approx(expected, abs=1e-12)
    assert float(ft.sign_similarity(model, model, x)) == 1.0
    assert_unchanged(model, model_before)
    assert_unchanged(ref, ref_before)


def test_record_signs_counts_every_call():
    model, x = make(SharedReluMLP, torch.float32), torch.randn(10, 3)
    record = ft.record_signs(model, x)
    assert isinstance(record, SignRecord)
    assert record.layers == ("act", "act")           # one module, two calls
    assert record.numels == (70, 70) and record.units == 140 and record.input_shape == (10, 3)
    assert [w.numel() for w in record.words] == [3, 3]  # ⌈70/32⌉ int32 words each
    cnn = ft.record_signs(make(SmallCNN, torch.float32), torch.randn(2, 2, 7, 7))
    assert cnn.layers == ("relu1", "relu2") and cnn.numels == (2 * 4 * 49, 2 * 3 * 9)


def test_sign_similarity_runs_in_eval_mode_and_unwraps_alpha_scaled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 20), nn.Dropout(0.5), nn.ReLU(), nn.Linear(20, 1)).train()
    x = torch.randn(30, 3)
    before = snapshot(model)
    assert float(ft.sign_similarity(model, model, x)) == 1.0  # dropout off, else masks differ
    wrapped = ft.AlphaScaled(model, alpha=100.0)
    ref = perturbed(model, 0.5)
    assert float(ft.sign_similarity(wrapped, ref, x)) == float(ft.sign_similarity(model, ref, x)) < 1
    assert_unchanged(model, before)


def test_sign_errors():
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="no nn.ReLU modules.*invisible to hooks.*use nn.ReLU"):
        ft.record_signs(FunctionalReluMLP(), x)
    with pytest.raises(ValueError, match="no nn.ReLU modules.*invisible to hooks"):
        ft.sign_similarity(FunctionalReluMLP(), FunctionalReluMLP(), x)
    model = make(SharedReluMLP, torch.float32)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"recorded on inputs of shape \(5, 3\).*same x"):
        ft.sign_similarity(model, ft.record_signs(model, x[:5]), x)
    with pytest.raises(ValueError, match="different architecture"):
        ft.sign_similarity(model, SharedReluMLP(hidden=9), x)
    with pytest.raises(ValueError, match="recorded on other inputs than x"):
        ft.sign_similarity(model, ft.record_signs(model, x), x + 0.5)
    renamed = nn.Sequential()  # the same ReLU units under other module names
    renamed.add_module("body", copy.deepcopy(model))
    with pytest.raises(ValueError, match="call 0 is 'body.*different architecture"):
        ft.sign_similarity(renamed, ft.record_signs(model, x), x)
    x_nan = x.clone()
    x_nan[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        ft.sign_similarity(model, model, x_nan)
    # the same first ReLU call (name 'act', 8 × 7 units), but no second one
    one_call = nn.Sequential(OrderedDict(fc1=nn.Linear(3, 7), act=nn.ReLU(), out=nn.Linear(7, 2)))
    with pytest.raises(ValueError, match="made 1 nn.ReLU calls but the reference made 2"):
        ft.sign_similarity(one_call, model, x)
    with pytest.raises(ValueError, match="reference made only 1 nn.ReLU calls"):
        ft.sign_similarity(model, one_call, x)
    with pytest.raises(TypeError, match="SignRecord"):
        ft.sign_similarity(model, torch.zeros(3), x)
    assert_unchanged(model, before)  # hooks removed although the forward raised


# ---------------------------------------------------------------------------- representations

@pytest.mark.parametrize("dtype", DTYPES)
def test_representations_default_and_named_layers(dtype):
    model = make(HeadDefinedFirst, dtype)
    x = torch.randn(9, 3, dtype=dtype)
    before = snapshot(model)
    hidden = F.linear(x, model.body.weight, model.body.bias)
    torch.testing.assert_close(ft.representations(model, x), F.relu(hidden), rtol=0, atol=0)
    torch.testing.assert_close(ft.representations(model, x, layer="body"), x, rtol=0, atol=0)
    torch.testing.assert_close(ft.representations(model, x, layer=model.act), hidden, rtol=0, atol=0)
    cnn = make(SmallCNN, dtype)
    xc = torch.randn(4, 2, 7, 7, dtype=dtype)
    pre = F.conv2d(F.relu(F.conv2d(xc, cnn.conv1.weight, cnn.conv1.bias, padding=1)),
                   cnn.conv2.weight, cnn.conv2.bias, stride=2)
    torch.testing.assert_close(ft.representations(cnn, xc), F.relu(pre).flatten(1))
    torch.testing.assert_close(ft.representations(cnn, xc, layer="relu2"), pre.flatten(1))
    torch.testing.assert_close(ft.representations(cnn, xc, layer=cnn.relu2), pre.flatten(1))
    # relu1 works in place: its input must be copied before the ReLU overwrites it
    conv1 = F.conv2d(xc, cnn.conv1.weight, cnn.conv1.bias, padding=1)
    assert (conv1 < 0).any()
    torch.testing.assert_close(ft.representations(cnn, xc, layer="relu1"), conv1.flatten(1))
    assert_unchanged(model, before)


def test_representation_errors():
    x = torch.randn(4, 2, 5, 5)
    conv_only = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear.*pass layer="):
        ft.representations(conv_only, x)
    with pytest.raises(ValueError, match="no submodule 'fc'"):
        ft.representations(conv_only, x, layer="fc")
    with pytest.raises(ValueError, match="not a submodule"):
        ft.representations(conv_only, x, layer=nn.ReLU())
    unused = HeadDefinedFirst()
    unused.spare = nn.Linear(2, 2)  # registered but not called by forward
    with pytest.raises(ValueError, match="never called layer 'spare'"):
        ft.representations(unused, torch.randn(4, 3), layer="spare")
    model = make(SharedReluMLP, torch.float32)
    with pytest.raises(ValueError, match="zero.*undefined"):
        ft.representation_alignment(model, torch.zeros(6, 4), torch.randn(6, 3))
    with pytest.raises(ValueError, match="same x"):
        ft.representation_alignment(model, torch.ones(5, 4), torch.randn(6, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [20, 4])  # d = 7: the O(n d²) route (d < n) and the n×n route
@pytest.mark.parametrize("centered", [False, True])
def test_representation_alignment_matches_explicit_grams(dtype, n, centered):
    model = make(SharedReluMLP, dtype)
    ref = perturbed(model, 0.4)
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(4), dtype=dtype)
    before = snapshot(model)
    R1 = F.relu(mlp_pre_activations(model, x)[1]).double()
    R2 = F.relu(mlp_pre_activations(ref, x)[1]).double()
    expected = np_alignment(R1 @ R1.T, R2 @ R2.T, centered)
    assert expected < 1 - 1e-4
    a = ft.representation_alignment(model, ref, x, centered=centered)
    assert a.dim() == 0 and a.dtype == dtype
    assert float(a) == pytest.approx(expected, abs=TOL[dtype])
    precomputed = ft.representations(ref, x)
    assert float(ft.representation_alignment(model, precomputed, x, centered=centered)) == pytest.approx(
        expected, abs=TOL[dtype])
    # a layer given as a module of `model` is found by name in the reference
    R1h = mlp_pre_activations(model, x)[1].double()
    R2h = mlp_pre_activations(ref, x)[1].double()
    a_act = ft.representation_alignment(model, ref, x, layer=model.act, centered=centered)
    assert float(a_act) == pytest.approx(np_alignment(R1h @ R1h.T, R2h @ R2h.T, centered), abs=TOL[dtype])
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------- NTK alignment

@pytest.fixture
def ntk_available():
    pytest.importorskip("fasttangent.ntk", reason="fasttangent.ntk (ntk_gram) is not available")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("outputs", ["trace", "full", 1])
def test_ntk_alignment_matches_jacobian_grams(ntk_available, dtype, outputs):
    model = make(SharedReluMLP, dtype)
    ref = perturbed(model, 0.3)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=dtype)
    model.train()
    before = snapshot(model)
    K1, K2 = jacobian_gram(model, x, outputs), jacobian_gram(ref, x, outputs)
    for centered in (False, True):
        expected = np_alignment(flatten_gram(K1), flatten_gram(K2), centered)
        assert expected < 1 - 1e-4
        a = ft.ntk_alignment(model, ref, x, outputs=outputs, centered=centered)
        assert a.dim() == 0 and float(a) == pytest.approx(expected, abs=10 * TOL[dtype])
        a_pre = ft.ntk_alignment(model, K2.to(dtype), x, outputs=outputs, centered=centered)
        assert float(a_pre) == pytest.approx(expected, abs=10 * TOL[dtype])
    assert float(ft.ntk_alignment(ft.AlphaScaled(model, 100.0), model, x, outputs=outputs)) == pytest.approx(
        1.0, abs=10 * TOL[dtype])
    assert_unchanged(model, before)


def test_ntk_alignment_uses_eval_mode_batchnorm_and_passes_gram_options(ntk_available):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        for _ in range(3):  # running statistics away from (0, 1)
            model(2.0 + 3.0 * torch.randn(16, 3, dtype=torch.float64))
    ref = perturbed(model, 0.3)
    x = torch.randn(7, 3, dtype=torch.float64)
    model.train()
    before = snapshot(model)
    expected = np_alignment(jacobian_gram(model, x, "trace"), jacobian_gram(ref, x, "trace"))
    assert expected < 1 - 1e-4
    a = ft.ntk_alignment(model, ref, x, block_size=3)  # several blocks of examples
    assert float(a) == pytest.approx(expected, abs=1e-10)
    assert_unchanged(model, before)  # running statistics and training flags untouched


def test_ntk_alignment_reference_shape_error(ntk_available):
    model, x = make(SharedReluMLP, torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="same x and the same outputs="):
        ft.ntk_alignment(model, jacobian_gram(model, x, "full"), x, outputs="trace")


# ---------------------------------------------------------------------------- LinearityProbe

@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_is_one_at_reference_and_matches_direct_metrics(ntk_available, dtype):
    model = make(SmallCNN, dtype)
    x = torch.randn(5, 2, 7, 7, generator=torch.Generator().manual_seed(6), dtype=dtype)
    reference = copy.deepcopy(model)
    probe = ft.LinearityProbe(model, x, outputs="full")
    at_ref = probe.measure()
    assert set(at_ref) == {"sign_similarity", "ntk_alignment", "repr_alignment"}
    assert all(v == pytest.approx(1.0, abs=10 * TOL[dtype]) for v in at_ref.values())
    before = snapshot(model)
    with torch.no_grad():  # "training" in place: the snapshot must not follow
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=dtype))
    moved = probe.measure()
    assert all(v < 1 - 1e-4 for v in moved.values()), moved
    assert moved["sign_similarity"] == float(ft.sign_similarity(model, reference, x))
    assert moved["ntk_alignment"] == pytest.approx(
        np_alignment(flatten_gram(jacobian_gram(model, x, "full")), flatten_gram(jacobian_gram(reference, x, "full"))),
        abs=10 * TOL[dtype])
    assert moved["repr_alignment"] == pytest.approx(
        float(ft.representation_alignment(model, reference, x)), abs=TOL[dtype])
    assert probe.measure(ft.AlphaScaled(model, 10.0)) == moved
    before = snapshot(model)
    probe.measure(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_without_ntk_and_without_relu(dtype):
    model = make(SharedReluMLP, dtype)
    x = torch.randn(12, 3, dtype=dtype)
    probe = ft.LinearityProbe(model, x, metrics=("sign_similarity", "repr_alignment"))
    assert probe.measure() == {"sign_similarity": 1.0, "repr_alignment": pytest.approx(1.0, abs=TOL[dtype])}
    moved = probe.measure(perturbed(model, 0.3))
    assert moved["sign_similarity"] < 1 and moved["repr_alignment"] < 1
    tanh = make(TanhMLP, dtype)
    probe = ft.LinearityProbe(tanh, x, metrics=None if _has_ntk() else ("repr_alignment",))
    assert "sign_similarity" not in probe.metrics and "sign_similarity" not in probe.measure()
    with pytest.raises(ValueError, match="no nn.ReLU modules"):
        ft.LinearityProbe(tanh, x, metrics=("sign_similarity",))
    with pytest.raises(ValueError, match="unknown metrics"):
        ft.LinearityProbe(tanh, x, metrics=("cka",))


@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_reports_an_undefined_metric_as_nan_on_request(dtype):
    """With every ReLU off, R = 0 and its alignment has no value: ``measure`` raises
    UndefinedMetricError, or with undefined="nan" reports NaN next to the defined metrics."""
    model = make(SharedReluMLP, dtype)
    x = torch.randn(12, 3, dtype=dtype)
    probe = ft.LinearityProbe(model, x, metrics=("sign_similarity", "repr_alignment"))
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.fc2.bias.fill_(-1e3)
    with pytest.raises(ft.UndefinedMetricError, match="is zero"):
        probe.measure(dead)
    measured = probe.measure(dead, undefined="nan")
    assert np.isnan(measured["repr_alignment"])
    expected = hand_sign_similarity(mlp_pre_activations(dead, x), mlp_pre_activations(model, x))
    assert measured["sign_similarity"] == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="undefined='skip' is invalid"):
        probe.measure(dead, undefined="skip")


def _has_ntk():
    try:
        import fasttangent.ntk  # noqa: F401
    except ImportError:
        return False
    return True
