"""ft.ntk_gram on layers that break the rules' assumptions (examples not first, modules
without a working vmap rule), against a reference built with plain autograd, one example
and one output at a time (no torch.func, whose vmap rules are what some of these break)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fasttangent as ft


def loop_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Trace Gram Σ_a J_a J_aᵀ (n, n) from per-example, per-output autograd gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[a], params,
                                                                                         retain_graph=True)])
                                 for a in range(out.shape[0])]))
    J = torch.stack(rows)  # (n, c, p)
    return torch.einsum("iap,jap->ij", J, J)


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
}


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
