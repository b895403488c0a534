"""Parameters owned by the ops that use them, rather than by a module without a rule.

A parameter that no structured rule covers (``class_token`` and ``pos_embedding`` of a
vision transformer, ConvNeXt's ``layer_scale``, a decoder tied through
``F.linear(h, embedding.weight)``) would otherwise belong to a whole module on the generic
rule, often the model itself, and its per-example gradients would re-run that module's
forward and backward passes for every example. Yet such a parameter usually enters the
computation through one op whose result carries the examples first (``x + pos``,
``cls.expand(n, -1, -1)``, ``gamma * y``, ``F.linear(h, w)``). Its per-example gradient
is then the vector-Jacobian product of that op alone:

    ∂f_ik/∂p = Σ_calls vjp(op, p)(g_ik)          g_ik = ∂f_ik/∂out_i, the op's cotangent,

which costs about as much as the op itself.

``ParameterOp`` is a stand-in module owning a group of such parameters (those that appear
together in some op). While the engine records a forward pass, ``OpRouter`` (a
``TorchFunctionMode``) sends every op that uses a parameter of a group through the
group's ``ParameterOp``, so that the usual module hooks record the op's arguments and
output and the backward passes deliver its cotangents. ``op_rule`` turns a recorded op
into per-example gradients:

- an op with per-example tensor arguments (x in ``x + pos``): a per-example vjp of the op
  on each example's slice, under vmap (the generic rule's machinery, on one op);
- an op without any (``cls.expand(n, -1, -1)``): the per-example gradient is the vjp of
  the op's output row i alone, computed as the vjp of the whole op with the cotangent
  kept on row i only.

A group whose op does not give the examples first (``w * scale`` before a convolution,
``pos[:, :T]``, an op on time-first sequences) or that writes into its input in place is
handed back to the module that would own it otherwise (``ParameterOp.restore``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._functional import call_with
from .capture import Call
from .rules import LayerContext, PerExampleGrads, _batched_leaves, _is_live, _sum_or_none, cotangents_or_zeros, \
    per_example_grads, probe_templates, register_rule


class ParameterOp(nn.Module):
    """Stand-in owner of parameters used directly by ops: ``self(func, *args, **kwargs)``
    is ``func(*args, **kwargs)`` with each of the group's parameters among the arguments
    replaced by this module's slot of the same parameter (what ``functional_call`` swaps
    when a rule differentiates the op).

    ``fallback``: {slot name: (module, name relative to it)}, where each parameter goes
    back if the group cannot be owned by its ops (``restore``)."""

    def __init__(self, params: dict, fallback: dict):
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name, p)
        self._slot_of = {id(p): name for name, p in params.items()}
        self.fallback = fallback
        self.in_place = False  # set when an op wrote its result into one of its inputs
        self.trace_nodes = False  # on the probe: collect the autograd nodes of the ops (``covered``)
        self.covered = set()

    def routes(self, leaves) -> bool:
        return any(isinstance(t, nn.Parameter) and id(t) in self._slot_of for t in leaves)

    def forward(self, func, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        swapped = [getattr(self, self._slot_of[id(t)]) if isinstance(t, nn.Parameter) and id(t) in self._slot_of
                   else t for t in leaves]
        args, kwargs = tree_unflatten(swapped, spec)
        out = func(*args, **kwargs)
        if self.trace_nodes:
            users = parameter_users(tree_flatten(out)[0], self._slot_of,
                                    stop=[t for t in leaves if isinstance(t, torch.Tensor)])
            self.covered.update(*users.values())
        inputs = {id(t) for t in leaves if isinstance(t, torch.Tensor)}
        if any(id(t) in inputs for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            self.in_place = True  # the recorded input now holds the result: its value is lost
        return out

    def restore(self, owners: dict, generic: set) -> None:
        """Hand the parameters back to their fallback owners (on the generic rule)."""
        owners.pop(self, None)
        for name, (module, rel) in self.fallback.items():
            owners.setdefault(module, {})[rel] = getattr(self, name)
            generic.add(module)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {module.__class__.__name__}.{rel}" for name, (module, rel) in self.fallback.items())


def parameter_users(outputs, param_ids, stop=()) -> dict:
    """{parameter id: set of autograd nodes}, in the graph behind ``outputs``, of the nodes
    with an edge into the gradient accumulator of a parameter whose id is in ``param_ids``;
    the walk does not go past the nodes of the tensors in ``stop`` (an op's inputs: then only
    the op's own nodes count). Unlike a TorchFunctionMode, the graph also shows uses inside
    ``autograd.Function``s and TorchScript."""
    stop_nodes = {t.grad_fn for t in stop if t.grad_fn is not None}
    stack = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen, users = set(), {}
    while stack:
        node = stack.pop()
        if node in seen or node in stop_nodes:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)  # AccumulateGrad: a leaf's accumulator
            if variable is not None:
                if id(variable) in param_ids:
                    users.setdefault(id(variable), set()).add(node)
                continue
            stack.append(child)
    return users


class OpRouter(TorchFunctionMode):
    """Within a forward pass, sends each op that uses a parameter of one of ``ops`` (a list
    of ``ParameterOp``) through that ``ParameterOp``, where the module hooks record it.
    Ops outside autograd (no grad mode) run unchanged: they cannot contribute."""

    def __init__(self, ops):
        super().__init__()
        self.ops = list(ops)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.ops and torch.is_grad_enabled():
            leaves, _ = tree_flatten((args, kwargs))
            for op in self.ops:
                if op.routes(leaves):
                    return op(func, *args, **kwargs)
        return func(*args, **kwargs)


def parameter_groups(candidates: dict, together: list) -> list:
    """Connected groups of parameter ids among ``candidates`` (ids), linked when they appear
    in the same op (``together``: one tuple of parameter ids per op use)."""
    parent = {pid: pid for pid in candidates}

    def root(pid):
        while parent[pid] != pid:
            parent[pid] = parent[parent[pid]]
            pid = parent[pid]
        return pid

    for ids in together:
        ids = [pid for pid in ids if pid in parent]
        for other in ids[1:]:
            parent[root(other)] = root(ids[0])
    groups = {}
    for pid in candidates:
        groups.setdefault(root(pid), []).append(pid)
    return list(groups.values())


def _same_layout(call: Call, probe_call: Call, n: int) -> bool:
    """Whether each tensor argument either keeps its shape between the probe (one example)
    and the block (a parameter, a table) or carries the examples first (leading 1 -> n):
    an argument that changes otherwise (a time-first sequence) carries the examples
    elsewhere, and the op would need a vjp of the whole batch per example."""
    leaves, _ = tree_flatten((call.raw_args, call.raw_kwargs))
    probe_leaves, _ = tree_flatten((probe_call.raw_args, probe_call.raw_kwargs))
    if len(leaves) != len(probe_leaves):
        return False
    for t, q in zip(leaves, probe_leaves):
        if not isinstance(t, torch.Tensor) or not isinstance(q, torch.Tensor) or t.shape == q.shape:
            continue
        if not (t.dim() == q.dim() > 0 and q.shape[0] == 1 and t.shape[0] == n and t.shape[1:] == q.shape[1:]):
            return False
    return True


def calls_are_per_example(op: ParameterOp, calls: list, n: int, probe_calls: list | None = None) -> bool:
    """Whether every recorded call of ``op`` on n examples returns differentiable tensors
    whose leading dimension is n (1 in the one-example probe), and no op wrote into its
    inputs or had them overwritten later (the rule re-runs the op on them), and (given the
    probe's calls) no argument carries the examples other than first."""
    if op.in_place or not calls or any(call.inputs_modified() for call in calls):
        return False
    # a call without a recorded output is an op outside autograd's sight (inside a vmap of
    # the forward, or not differentiable): too little is known about it
    if not all(call.outputs and all(o.dim() > 0 and o.shape[0] == n for o in call.outputs) for call in calls):
        return False
    if probe_calls and len(probe_calls) == len(calls):
        return all(_same_layout(call, probe, n) for call, probe in zip(calls, probe_calls))
    return True


# ----------------------------------------------------------------------------------------
# The rule.

def _masked_rows_vjp(op: ParameterOp, params: dict, call: Call, n: int, c: int, chunk: int) -> dict:
    """Per-example gradients of an op without per-example arguments: for example i and
    output k, the vjp of the whole op with the cotangent g_k kept on row i (zero elsewhere),
    which is the vjp of output row i alone. vmap over examples in chunks of ``chunk``."""
    args, kwargs = call.raw_args, call.raw_kwargs
    positions = call.output_positions

    def forward(p):
        out_leaves, _ = tree_flatten(call_with(op, p, args, kwargs))
        return tuple(out_leaves[i] for i in positions)

    _, pullback = vjp(forward, params)
    cots = cotangents_or_zeros(call, params, n, c)
    rows = torch.eye(n, dtype=cots[0].dtype, device=cots[0].device)

    def one_example(row):
        # the outputs in a loop, not a nested vmap (see ``rules._per_example_vjp``)
        per_output = [pullback(tuple(g[:, k] * row.view(n, *([1] * (g.dim() - 2))) for g in cots))[0]
                      for k in range(c)]
        return {name: torch.stack([grads[name] for grads in per_output]) for name in params}

    return vmap(one_example, chunk_size=chunk)(rows)


def _masked_rows_loop(op: ParameterOp, params: dict, call: Call, n: int, c: int) -> dict:
    """The gradients of ``_masked_rows_vjp`` from plain autograd, one example and output at a
    time (for ops whose vmap rules fail)."""
    leaf_params = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    grads = {name: p.new_zeros((n, c, *p.shape)) for name, p in params.items()}
    with torch.enable_grad():
        out_leaves, _ = tree_flatten(call_with(op, leaf_params, call.raw_args, call.raw_kwargs))
    pairs = [(out_leaves[j], g) for j, g in zip(call.output_positions, call.cotangents) if g is not None]
    for i in range(n):
        for k in range(c):
            masked = []
            for _, g in pairs:
                row = torch.zeros_like(g[:, k])
                row[i] = g[i, k]
                masked.append(row)
            last = i + 1 == n and k + 1 == c
            per_param = torch.autograd.grad([o for o, _ in pairs], list(leaf_params.values()), grad_outputs=masked,
                                            retain_graph=not last, allow_unused=True)
            for name, g in zip(leaf_params, per_param):
                if g is not None:
                    grads[name][i, k] = g.to_dense() if g.layout != torch.strided else g
    return grads


def _masked_rows(op: ParameterOp, params: dict, call: Call, n: int, c: int, term_bytes: int | None) -> dict:
    """Per-example gradients from the vjp of the whole op with the cotangent kept on one row
    (exact for any op whose output row i belongs to example i): under vmap, or with plain
    autograd where the op has no batching rule."""
    try:
        return _masked_rows_vjp(op, params, call, n, c, _example_chunk(call, n, c, term_bytes))
    except (RuntimeError, ValueError):
        return _masked_rows_loop(op, params, call, n, c)


def _example_chunk(call: Call, n: int, c: int, term_bytes: int | None) -> int:
    """Examples per vmap chunk of ``_masked_rows_vjp``: each holds c masked copies of the
    op's whole output (n rows) per example."""
    per_example = c * n * sum(o.numel() * o.element_size() for o in call.outputs)
    return max(1, min(n, (term_bytes or per_example * n) // max(per_example, 1)))


def op_rule(ctx: LayerContext):
    """``ParameterOp``: per-example vjp of each recorded op alone (see the module docstring)."""
    op, n, c = ctx.module, ctx.n, ctx.c
    params = {name: p.detach() for name, p in ctx.params.items()}
    totals = []
    for call, probe_call in zip(ctx.calls, probe_templates(ctx)):
        if not _is_live(call):
            continue
        leaves, _ = tree_flatten((call.raw_args, call.raw_kwargs))
        # without the probe's view of the call, a (T, d) table with T = n would be sliced
        # as if per example: masked rows need no such guess
        probe_leaves = None if probe_call is None else tree_flatten((probe_call.raw_args, probe_call.raw_kwargs))[0]
        if probe_leaves is not None and len(probe_leaves) == len(leaves) and any(_batched_leaves(leaves, probe_call, n)):
            try:
                grads = per_example_grads(op, params, call, n, c, probe_call)
            except (RuntimeError, ValueError):  # the op does not run on one example's slice
                grads = _masked_rows(op, params, call, n, c, ctx.term_bytes)
        else:
            grads = _masked_rows(op, params, call, n, c, ctx.term_bytes)
        totals.append(torch.cat([grads[name].reshape(n, c, -1) for name in params], dim=2))
    total = _sum_or_none(totals)
    return [] if total is None else [PerExampleGrads(total)]


op_rule.needs_grad = True  # torch.func differentiates the op: built after each pass, with grad enabled
register_rule(ParameterOp, op_rule)
