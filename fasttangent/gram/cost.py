"""Cost model choosing how a convolution / sequence layer's weight Gram is computed.

A layer whose weight acts on positions (a convolution after unfolding, or a Linear on
(n, T, d) inputs) has per-example, per-output weight gradient Gᵢₖᵀ Aᵢ, with
Aᵢ (T, d_in) the unfolded input patches and Gᵢₖ (T, d_out) the output cotangent of
model output k. Two exact ways to get its Gram term, per group of a grouped conv:

factored      K[i, j] += Σ_k ⟨Aᵢ Aⱼᵀ, Gᵢₖ Gⱼₖᵀ⟩_F
              MACs   ≈ n₁ n₂ T² (d_in + c d_out) + 2 n₁ n₂ T²      (+ n₁ n₂ T c² d_out for "full")
                       + c · TERM_OVERHEAD_MACS (the fixed cost of a term)
              memory ≈ 2 n₁ n₂ T² elements (the two T×T products of every pair;
                       + n₁ n₂ c T d_out for "full")
materialized  Jᵢₖ = Gᵢₖᵀ Aᵢ (a batched matmul), then K += J₁ J₂ᵀ
              MACs   ≈ (n₁ + n₂) c T d_in d_out + n₁ n₂ c d_in d_out  (× c for "full")
              memory ≈ (n₁ + n₂) c d_in d_out elements

(c is the number of model outputs that enter the Gram: all of them for "trace" and
"full", one for a single output.) The factored form wins when positions are few and
the weight is large (deep conv layers on small maps, dense layers: T = 1); the
materialized form wins when T is large and the weight small (first conv layers:
T = 1024 on CIFAR-size inputs). The cheaper one by MACs is chosen among the forms
whose memory fits the budget; when neither fits, the smaller in memory.
"""
from __future__ import annotations

import dataclasses

# Fixed cost of one factored term (Python, dispatch, small-kernel launches), in
# multiply-adds: about 50 µs at ~50 GMAC/s. A grouped conv's factored form has one term
# per group and output, its materialized form one batched matmul: without this, a
# depthwise conv with 1152 groups on a 1×1 map picked factored and ran 30× slower.
TERM_OVERHEAD_MACS = 2.5e6

FACTORED = "factored"
MATERIALIZED = "materialized"
FORMS = ("auto", FACTORED, MATERIALIZED)


@dataclasses.dataclass(frozen=True)
class PatchShape:
    """Size of one positions-layer weight: T positions (all calls together), per-group
    fan-in ``d_in`` and fan-out ``d_out``, and the number of groups."""

    positions: int
    d_in: int
    d_out: int
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class FormCost:
    """Estimated multiply-adds and peak temporary elements of one form."""

    macs: float
    elements: float


def factored_cost(shape: PatchShape, n1: int, n2: int, c: int, full: bool) -> FormCost:
    pairs_t2 = n1 * n2 * shape.positions**2
    macs = pairs_t2 * (shape.d_in + c * shape.d_out) + 2 * pairs_t2
    elements = 2.0 * pairs_t2
    if full:
        macs += n1 * n2 * shape.positions * c * c * shape.d_out
        elements += n1 * n2 * shape.positions * c * shape.d_out
    return FormCost(macs=shape.groups * (macs + c * TERM_OVERHEAD_MACS), elements=elements)


def materialized_cost(shape: PatchShape, n1: int, n2: int, c: int, full: bool) -> FormCost:
    weight = shape.d_in * shape.d_out * shape.groups
    gram_macs = n1 * n2 * c * weight * (c if full else 1)
    macs = (n1 + n2) * c * shape.positions * weight + gram_macs
    return FormCost(macs=macs, elements=float((n1 + n2) * c * weight))


def choose_form(shape: PatchShape, n1: int, n2: int, c: int, *, full: bool, budget_elements: float) -> str:
    """Return ``"factored"`` or ``"materialized"`` for one layer (see the module docstring)."""
    costs = {FACTORED: factored_cost(shape, n1, n2, c, full),
             MATERIALIZED: materialized_cost(shape, n1, n2, c, full)}
    fitting = [form for form, cost in costs.items() if cost.elements <= budget_elements]
    if fitting:
        return min(fitting, key=lambda form: costs[form].macs)
    return min(costs, key=lambda form: costs[form].elements)
