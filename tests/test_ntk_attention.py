"""The nn.MultiheadAttention rule (``gram.attention``) against plain-autograd references,
over the module's options and masks; configurations it does not re-implement must take
the generic rule and stay exact."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fasttangent as ft
from fasttangent.gram.attention import attention_rule
from fasttangent.gram.engine import GramEngine
from references import loop_jacobian

L, E, HEADS = 4, 6, 2


class Attend(nn.Module):
    """tokens (n, L, 3) -> embed -> attention (with the given options) -> head (n, 3)."""

    def __init__(self, mode="self", need_weights=False, mask=None, padding=False, kdim=None, bias=True,
                 batch_first=True, **options):
        super().__init__()
        self.embed = nn.Linear(3, E)
        self.other = nn.Linear(3, kdim or E)
        self.attention = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias,
                                               **options)
        self.head = nn.Linear(E + (L if need_weights else 0), 3)
        self.mode, self.need_weights, self.mask, self.padding = mode, need_weights, mask, padding
        self.batch_first = batch_first

    def _mask(self, x):
        """Masks that depend on each example alone (so that one example at a time agrees)."""
        if self.mask == "causal_bool":
            return torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        if self.mask == "float":
            return torch.linspace(-1, 1, L * L, dtype=x.dtype).view(L, L)
        if self.mask == "per_head":  # (n * heads, L, L), example-major as the module expects
            per_example = torch.tanh(x[:, :, :1] - x[:, None, :, 1])  # (n, L, L)
            return torch.cat([per_example * (h + 1) for h in range(HEADS)], dim=1).view(-1, L, L)
        return None

    def forward(self, x):
        n = x.shape[0]
        h = self.embed(x)
        if self.mode == "self":
            q = k = v = h
        elif self.mode == "cross":
            q, k, v = h, torch.tanh(self.other(x)), torch.tanh(self.other(x.flip(1)))
        else:  # same values, separate tensors
            q, k, v = h, h.clone(), h.clone()
        padding = None
        if self.padding:  # an example masks its last key when its first feature there is positive
            padding = torch.zeros(n, L, dtype=torch.bool)
            padding[:, -1] = x[:, -1, 0] > 0
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out, weights = self.attention(q, k, v, key_padding_mask=padding, attn_mask=self._mask(x),
                                      need_weights=self.need_weights)
        if not self.batch_first:
            out = out.transpose(0, 1)
        feats = out.mean(1)
        if self.need_weights:
            feats = torch.cat([feats, weights.mean(1)], dim=1)
        return self.head(torch.tanh(feats))


CASES = {
    "self": {},
    "self_weights_used": {"need_weights": True},
    "causal_bool_mask": {"mask": "causal_bool"},
    "float_mask_and_padding": {"mask": "float", "padding": True},
    "per_head_mask": {"mask": "per_head"},
    "cross": {"mode": "cross"},
    "separate_tensors": {"mode": "separate"},
    "kdim_vdim": {"mode": "cross", "kdim": 5},
    "no_bias": {"bias": False},
}
GENERIC_CASES = {
    "sequence_first": {"batch_first": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
}


def _reference(model, x):
    J = loop_jacobian(model, x)
    return torch.einsum("iap,jap->ij", J, J)


def _attention_rule_used(model, x) -> bool:
    engine = GramEngine(model, full=False, selected=[0], backend="torch", memory_budget=1 << 30, conv_form="auto")
    engine.term_bytes = 1 << 24
    engine.probe(x)
    engine._record(x)
    return engine.rule(model.attention) is attention_rule and model.attention in engine.owners


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_attention_rule_matches_loop_reference(name, dtype):
    torch.manual_seed(0)
    model = Attend(**CASES[name]).double().eval()
    x = torch.randn(5, L, 3, dtype=torch.float64)
    reference = _reference(model, x)
    assert _attention_rule_used(model, x)
    K = ft.ntk_gram(model.to(dtype), x.to(dtype))
    assert ((K.double() - reference).norm() / reference.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("name", list(GENERIC_CASES))
def test_other_configurations_stay_exact(name):
    torch.manual_seed(0)
    model = Attend(**GENERIC_CASES[name]).double().eval()
    x = torch.randn(5, L, 3, dtype=torch.float64)
    assert not _attention_rule_used(model, x)
    reference = _reference(model, x)
    K = ft.ntk_gram(model, x)
    assert ((K - reference).norm() / reference.norm()).item() < 1e-10


def test_cross_full_and_factored_forms():
    torch.manual_seed(1)
    model = Attend(mode="cross", need_weights=True, padding=True).double().eval()
    x1, x2 = torch.randn(4, L, 3, dtype=torch.float64), torch.randn(3, L, 3, dtype=torch.float64)
    J1, J2 = loop_jacobian(model, x1), loop_jacobian(model, x2)
    full = torch.einsum("iap,jbp->ijab", J1, J2)
    assert torch.allclose(ft.ntk_gram(model, x1, x2, outputs="full"), full, rtol=1e-10, atol=1e-12)
    for form in ("factored", "materialized"):
        K = ft.ntk_gram(model, x1, x2, conv_form=form)
        assert torch.allclose(K, full.diagonal(dim1=2, dim2=3).sum(-1), rtol=1e-10, atol=1e-12), form


def test_transformer_encoder_layer():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                          nn.Flatten(), nn.Linear(8 * L, 2)).double().eval()
    x = torch.randn(4, L, 3, dtype=torch.float64)
    reference = _reference(model, x)
    K = ft.ntk_gram(model, x)
    assert ((K - reference).norm() / reference.norm()).item() < 1e-10


class WeightsOnly(nn.Module):
    """Only the attention weights reach the output (attention pooling scores)."""

    def __init__(self, average=True):
        super().__init__()
        self.embed, self.average = nn.Linear(3, E), average
        self.attention = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.head = nn.Linear(L * L * (1 if average else HEADS), 3)

    def forward(self, x):
        h = self.embed(x)
        _, weights = self.attention(h, h, h, need_weights=True, average_attn_weights=self.average)
        return self.head(weights.flatten(1))


class CausalHint(nn.Module):
    """is_causal=True with a mask that is not causal: torch applies the causal mask."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(3, E), nn.Linear(L * E, 3)
        self.attention = nn.MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, x):
        h = self.embed(x)
        anti_causal = torch.ones(L, L, dtype=torch.bool).tril(-1)
        out, _ = self.attention(h, h, h, attn_mask=anti_causal, need_weights=False, is_causal=True)
        return self.head(torch.tanh(out).flatten(1))


def _frozen(name):
    model = Attend(mode="cross", kdim=5)
    getattr(model.attention, name).requires_grad_(False)
    return model


REGRESSIONS = {
    "weights_only": WeightsOnly,
    "weights_only_per_head": lambda: WeightsOnly(average=False),
    "causal_hint": CausalHint,
    "frozen_q_projection": lambda: _frozen("q_proj_weight"),
    "frozen_v_projection": lambda: _frozen("v_proj_weight"),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regressions(name):
    torch.manual_seed(0)
    model = REGRESSIONS[name]().double().eval()
    x = torch.randn(5, L, 3, dtype=torch.float64)
    assert _attention_rule_used(model, x)
    reference = _reference(model, x)
    assert ((ft.ntk_gram(model, x) - reference).norm() / reference.norm()).item() < 1e-10
