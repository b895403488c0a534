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
into per-example gradients, cheapest first:

- closed forms (``closed_form_grads``): for ``x + p``, ``x - p``, ``x * p`` and
  expansions, g (times x) summed over the dimensions p was broadcast over; for dense ops
  (``x @ w``, ``w @ x``, ``F.linear(x, w, b)``) Σ_t g_t ⊗ x_t, and when every call of a
  group is the same dense use, one factored term planned like nn.Linear's;
- an op with per-example tensor arguments (x in ``torch.where(m, x, p)``): a per-example
  vjp of the op on each example's slice, under vmap (the generic rule's machinery, on
  one op);
- an op without any: the per-example gradient is the vjp of the op's output row i alone,
  computed as the vjp of the whole op with the cotangent kept on row i only.

Shared tensors. The router also tracks which tensors carry the examples (the model's
input and every result of an op on one). An op on a group's parameters without any such
argument (``pos[:, :T]``, nanoGPT's ``wpe(arange(T))``, ``w.T``, ``v / ‖v‖ · g``) makes
a tensor shared by all examples: it is not recorded but kept on the group's tape
(``ParameterOp.run_shared``), and the ops combining it with the examples are the group's
recorded ops. Their per-example gradient with respect to the shared tensor is pulled back
to the parameters through the tape (a vjp of the tape, vmapped over examples and
outputs), and the vjp routes replay the tape from the functional parameters. Groups whose
shared tensors meet in one op are joined.

A group is handed back to the module that would own it otherwise (``ParameterOp.restore``,
generic rule) when an op does not give the examples first (an op on time-first
sequences), writes into its input in place, sees its inputs overwritten later, has uses
that only the autograd graph shows (an ``autograd.Function`` or TorchScript using a
parameter or a shared tensor), or makes a "shared" tensor that grows with the batch (the
examples came through TorchScript, where the router cannot follow them).
"""
from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._functional import call_with
from .capture import Call
from .cost import FACTORED, PatchShape
from .rules import FactoredTerm, LayerContext, PerExampleGrads, _batched_leaves, _is_live, _sum_or_none, cotangents_or_zeros, \
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
        self._originals = dict(params)
        self.fallback = fallback
        self.in_place = False  # set when an op wrote its result into one of its inputs
        self.tangled = False  # set when an op mixed this group's tensors with another group's
        self.trace_nodes = False  # on the probe: collect the autograd nodes of the ops (``covered``)
        self.covered = set()
        # shared tensors: results of ops on the group's parameters without the examples
        # (pos[:, :T], an embedding of arange(T), w * g), {id: (weakref, tape)}; a tape is the
        # list of such ops of one forward pass, (func, args, kwargs, weakrefs and shapes of
        # the results): weak, so that a pass's shared tensors go with its recorded calls
        self.shared_tensors = {}
        self.tape = []
        self.probe_tape_shapes = None

    def forward(self, func, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        replayed = self._replayed(leaves)
        swapped = [getattr(self, self._slot_of[id(t)]) if self.owns_parameter(t) else replayed.get(id(t), t)
                   for t in leaves]
        args, kwargs = tree_unflatten(swapped, spec)
        out = func(*args, **kwargs)
        self._after_op(leaves, out)
        return out

    def run_shared(self, func, args: tuple, kwargs: dict):
        """Run an op on the group's tensors that does not involve the examples: its result is
        a shared tensor of this group, not recorded (it has no per-example cotangent); the
        ops using it are routed here, and a rule differentiating them replays the tape."""
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs:  # p.shape, p.dim(): nothing to differentiate
            return out
        self._after_op(tree_flatten((args, kwargs))[0], out)
        refs = [weakref.ref(t) for t in outputs]
        self.tape.append((func, args, kwargs, refs, [tuple(t.shape) for t in outputs]))
        for t, ref in zip(outputs, refs):
            self.shared_tensors[id(t)] = (ref, self.tape)
        return out

    def _after_op(self, leaves, out) -> None:
        if self.trace_nodes:
            users = parameter_users(tree_flatten(out)[0], self._slot_of,
                                    stop=[t for t in leaves if isinstance(t, torch.Tensor)],
                                    targets=self.shared_nodes())
            self.covered.update(*users.values())
        inputs = {id(t) for t in leaves if isinstance(t, torch.Tensor)}
        if any(id(t) in inputs for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            self.in_place = True  # the recorded input now holds the result: its value is lost

    def owns_parameter(self, t) -> bool:
        """Whether ``t`` is one of this group's parameters."""
        return isinstance(t, nn.Parameter) and id(t) in self._slot_of

    def shared_tensor(self, t) -> bool:
        """Whether ``t`` is a shared tensor of this group (a result of ``run_shared``)."""
        entry = self.shared_tensors.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry is not None and entry[0]() is t

    def shared_nodes(self) -> set:
        """The autograd nodes of the live shared tensors (their uses count as the group's)."""
        nodes = set()
        for ref, _ in self.shared_tensors.values():
            t = ref()
            if t is not None and t.grad_fn is not None:
                nodes.add(t.grad_fn)
        return nodes

    def replay(self, tape: list, values: dict) -> dict:
        """{id of a shared tensor: its value recomputed from ``values`` ({slot: tensor}, e.g.
        the functional parameters of a vjp)}: the ops of ``tape`` run again in order."""
        current = {id(p): (p, values[slot]) for slot, p in self._originals.items()}  # id: (old, new)

        def swap(t):
            entry = current.get(id(t)) if isinstance(t, torch.Tensor) else None
            return entry[1] if entry is not None and entry[0] is t else t

        for func, args, kwargs, refs, _ in tape:
            leaves, spec = tree_flatten((args, kwargs))
            out_args, out_kwargs = tree_unflatten([swap(t) for t in leaves], spec)
            results = [t for t in tree_flatten(func(*out_args, **out_kwargs))[0] if isinstance(t, torch.Tensor)]
            for ref, new in zip(refs, results):
                old = ref()
                if old is not None:  # a result nothing holds any more is needed by no call
                    current[id(old)] = (old, new)
        return {key: new for key, (_, new) in current.items()}

    def _replayed(self, leaves) -> dict:
        """Shared tensors among ``leaves`` recomputed from this module's current slots when
        those are not the parameters themselves (``functional_call`` swapped them: a rule
        differentiates the op); {} during the recorded forward pass."""
        shared = [t for t in leaves if self.shared_tensor(t)]
        if not shared or all(getattr(self, slot) is p for slot, p in self._originals.items()):
            return {}
        values = {slot: getattr(self, slot) for slot in self._originals}
        replayed = {}
        for tape in {id(self.shared_tensors[id(t)][1]): self.shared_tensors[id(t)][1] for t in shared}.values():
            replayed.update(self.replay(tape, values))
        return replayed

    def pull_back(self, shared: torch.Tensor, grads: torch.Tensor, params: dict) -> dict:
        """{name: (n, c, *shape)} from per-example gradients (n, c, *shared.shape) of a shared
        tensor: the vjp of the tape that made it, for every example and output at once."""
        tape = self.shared_tensors[id(shared)][1]
        _, pullback = vjp(lambda p: self.replay(tape, p)[id(shared)], params)
        n, c = grads.shape[:2]
        flat = grads.reshape(n * c, *shared.shape)
        try:
            pulled = vmap(lambda g: pullback(g)[0])(flat)
        except (RuntimeError, ValueError):  # an op of the tape without a batching rule
            rows = [pullback(g)[0] for g in flat]
            pulled = {name: torch.stack([row[name] for row in rows]) for name in params}
        return {name: pulled[name].reshape(n, c, *p.shape) for name, p in params.items()}

    def start_pass(self) -> None:
        """A new forward pass: a new tape; shared tensors no longer alive are forgotten."""
        self.tape = []
        self.shared_tensors = {k: v for k, v in self.shared_tensors.items() if v[0]() is not None}

    def tape_shapes(self) -> list:
        return [shapes for _, _, _, _, shapes in self.tape]

    def restore(self, owners: dict, generic: set) -> None:
        """Hand the parameters back to their fallback owners (on the generic rule)."""
        owners.pop(self, None)
        for name, (module, rel) in self.fallback.items():
            owners.setdefault(module, {})[rel] = getattr(self, name)
            generic.add(module)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {module.__class__.__name__}.{rel}" for name, (module, rel) in self.fallback.items())


def parameter_users(outputs, param_ids, stop=(), targets=()) -> dict:
    """{parameter id: set of autograd nodes}, in the graph behind ``outputs``, of the nodes
    with an edge into the gradient accumulator of a parameter whose id is in ``param_ids``
    (and {node: set of nodes} of those with an edge into a node of ``targets``: the uses of
    shared tensors); the walk does not go past the nodes of the tensors in ``stop`` (an op's
    inputs: then only the op's own nodes count). Unlike a TorchFunctionMode, the graph also
    shows uses inside ``autograd.Function``s and TorchScript."""
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
            if child in targets:
                users.setdefault(child, set()).add(node)
            variable = getattr(child, "variable", None)  # AccumulateGrad: a leaf's accumulator
            if variable is not None:
                if id(variable) in param_ids:
                    users.setdefault(id(variable), set()).add(node)
                continue
            stack.append(child)
    return users


# broadcasts (the closed forms sum their gradient), and every op that makes the examples'
# rows from no example (cls.expand(n, -1, -1)), which the router records as per example
_EXPAND = {torch.Tensor.expand, torch.broadcast_to, torch.Tensor.broadcast_to}
_EXPANSIONS = _EXPAND | {torch.Tensor.expand_as, torch.Tensor.repeat}


class OpRouter(TorchFunctionMode):
    """Within a forward pass, sends each op that uses a parameter or a shared tensor of one
    of ``ops`` (a list of ``ParameterOp``) through that ``ParameterOp``, where the module
    hooks record it. The tensors that carry the examples (``inputs``, and every result of an
    op on one of them) are tracked: an op of a group without any is a shared op
    (``ParameterOp.run_shared``), not recorded. Ops outside autograd (no grad mode) are not
    routed: they cannot contribute."""

    def __init__(self, ops, inputs=()):
        super().__init__()
        self.ops = list(ops)
        # parameter id -> its group: one lookup per argument, not one scan of every group
        self._op_of = {pid: op for op in self.ops for pid in op._slot_of}
        self._examples = {}  # id -> weakref of the tensors that carry the examples
        self._shared = {}  # id -> (weakref, group) of the shared tensors of this pass
        self.joined = []  # the groups that some op used together (tuples)
        self._mark_examples(tree_flatten(inputs)[0])

    def __enter__(self):
        for op in self.ops:
            op.start_pass()
        return super().__enter__()

    def _mark_examples(self, leaves) -> None:
        for t in leaves:
            if isinstance(t, torch.Tensor):
                self._examples[id(t)] = weakref.ref(t)

    def _carries_examples(self, t) -> bool:
        ref = self._examples.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def _groups_of(self, leaves) -> list:
        groups = []
        for t in leaves:
            if not isinstance(t, torch.Tensor):
                continue
            if isinstance(t, nn.Parameter):
                op = self._op_of.get(id(t))
            else:
                entry = self._shared.get(id(t))
                op = entry[1] if entry is not None and entry[0]() is t else None
            if op is not None and op not in groups:
                groups.append(op)
        return groups

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = _leaves(args, kwargs)
        examples = any(self._carries_examples(t) for t in leaves)
        groups = self._groups_of(leaves) if torch.is_grad_enabled() else []
        if len(groups) > 1:  # an op joining two groups: neither can be differentiated alone
            self.joined.append(tuple(groups))
            for op in groups:
                op.tangled = True
        # an expansion (cls.expand(n, -1, -1)) makes the examples' rows from no example: its
        # result is per example, recorded like any op with the examples
        examples = examples or func in _EXPANSIONS
        if not groups:
            out = func(*args, **kwargs)
        elif examples:
            out = groups[0](func, *args, **kwargs)
        else:
            out = groups[0].run_shared(func, args, kwargs)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._shared[id(t)] = (weakref.ref(t), groups[0])
            return out
        if examples:
            self._mark_examples(tree_flatten(out)[0] if isinstance(out, (list, tuple, dict)) else (out,))
        return out


def _leaves(args: tuple, kwargs: dict):
    """The arguments' leaves; without pytree's cost when no argument is a container (most
    ops: the mode sees every op of the forward pass)."""
    flat = (*args, *kwargs.values())
    if any(isinstance(a, (list, tuple, dict)) for a in flat):
        return tree_flatten((args, kwargs))[0]
    return flat


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
    if op.in_place or op.tangled or not calls or any(call.inputs_modified() for call in calls):
        return False
    if n > 1 and op.probe_tape_shapes is not None and op.tape_shapes() != op.probe_tape_shapes:
        return False  # a "shared" result that grows with the batch was per example after all
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


# Closed forms of the commonest ops, exact and without vmap: a model built from hundreds
# of ``x @ w + b`` / ``gamma * y`` ops would otherwise pay a vmap per op and output. Each
# assumes only what every op rule does: row i of the op's output is example i's.

_ADD = {torch.add, torch.Tensor.add}
_SUB = {torch.sub, torch.Tensor.sub}
_MUL = {torch.mul, torch.Tensor.mul}
_MATMUL = {torch.matmul, torch.Tensor.matmul}
_LINEAR = {F.linear}


def _sum_to_parameter(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
    """Reduce t (n, c, *S), S the op output's trailing shape, to (n, c, *p.shape) by summing
    the dimensions over which p was broadcast; None when p was not broadcast over the
    examples (p's aligned leading dimension is not 1: its rows are not shared)."""
    full = (1,) * (t.dim() - 1 - p.dim()) + tuple(p.shape)  # p aligned right to (n, *S)
    if len(full) != t.dim() - 1 or full[0] != 1:
        return None
    trailing = t.shape[2:]
    summed = [2 + d for d, (size, out) in enumerate(zip(full[1:], trailing)) if size == 1 and out != 1]
    if any(size not in (1, out) for size, out in zip(full[1:], trailing)):
        return None
    if summed:
        t = t.sum(dim=summed, keepdim=True)
    return t.reshape(t.shape[0], t.shape[1], *p.shape)


def _elementwise_grad(func, args, slot: int, g: torch.Tensor):
    """Per-example gradient (n, c, *S) of the op's argument ``slot`` (before the reduction
    to the parameter's shape) for +, -, * and expansions, or None for another op."""
    other = args[1 - slot] if len(args) == 2 else None
    if func in _ADD and len(args) == 2:  # not the deprecated add(x, alpha, p)
        return g
    if func in _SUB and len(args) == 2:
        return g if slot == 0 else -g
    if func in _MUL and len(args) == 2:
        if isinstance(other, torch.Tensor):
            if other.is_complex() or other.dim() > g.dim() - 1:
                return None
            # other broadcasts against the output (n, *S): align it with g's (n, c, *S)
            other = other.unsqueeze(1) if other.dim() == g.dim() - 1 else other
        elif not isinstance(other, (int, float)):
            return None
        return g * other
    if func in _EXPAND and slot == 0:
        return g
    return None


@dataclasses.dataclass(frozen=True)
class DenseUse:
    """A parameter used as the weight of a dense op (``F.linear(x, w, b)``, ``x @ w``,
    ``w @ x``) with x carrying the examples first: per example, its gradient is
    Σ_t g_t ⊗ a_t over positions t, a factored term like nn.Linear's. ``bias``: the slot of
    ``F.linear``'s bias when the group owns it too (it rides as a column of ones in a);
    ``cotangent_dim``: the weight dimension the output cotangent g runs along (0 for
    ``F.linear`` and ``w @ x``, 1 for ``x @ w``)."""

    weight: str
    bias: str | None
    cotangent_dim: int


def dense_use(op: ParameterOp, call: Call) -> DenseUse | None:
    """How one recorded call uses its group's parameters as a dense weight, or None."""
    if len(call.outputs) != 1 or call.output_positions != [0] or call.raw_kwargs:
        return None
    func, args = call.raw_args[0], call.raw_args[1:]
    if not _only_top_level(op, args) or any(op.shared_tensor(a) for a in args):
        return None  # a shared tensor's gradient needs its tape: not a dense use

    def data(t, least_dim):  # a per-example operand: not one of the group's parameters
        return isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.dim() >= least_dim

    def weight(t):
        return op.owns_parameter(t) and t.dim() == 2 and not t.is_complex()

    if func in _LINEAR and len(args) in (2, 3) and data(args[0], 2) and weight(args[1]):
        bias = args[2] if len(args) == 3 else None
        owned = op.owns_parameter(bias)
        if bias is not None and not owned and not isinstance(bias, torch.Tensor):
            return None
        if owned and tuple(bias.shape) != (args[1].shape[0],):
            return None  # a broadcast bias ((1,), ()) is not one column of ones
        return DenseUse(op._slot_of[id(args[1])], op._slot_of[id(bias)] if owned else None, 0)
    if func in _MATMUL and len(args) == 2:
        x, w = args
        if data(x, 2) and weight(w):
            return DenseUse(op._slot_of[id(w)], None, 1)
        if weight(x) and data(w, 3):  # w (d_out, d_in) @ x (n, ..., d_in, T)
            return DenseUse(op._slot_of[id(x)], None, 0)
    return None


def _dense_operand(use: DenseUse, call: Call) -> tuple:
    """(x, feature dim) of a dense call: the per-example operand, and the dimension of x the
    weight contracts (-1 for ``F.linear`` and ``x @ w``, -2 for ``w @ x``, whose positions
    are x's last dimension)."""
    func, args = call.raw_args[0], call.raw_args[1:]
    if func in _MATMUL and use.cotangent_dim == 0:
        return args[1], -2
    return args[0], -1


def dense_patches(use: DenseUse, call: Call, n: int, c: int, with_ones: bool | None = None) -> tuple:
    """(A (n, T, d_a), G (n, c, T, d_g)) of one dense call: the operand's positions and the
    output cotangent's, such that the weight's per-example gradient is Σ_t G_t ⊗ A_t (laid
    out along the weight's dims by ``use.cotangent_dim``); a column of ones is appended
    to A when the bias rides along (``with_ones``, by default when the group owns it)."""
    x, feature = _dense_operand(use, call)
    g = call.cotangents[0]
    if feature == -2:
        x, g = x.transpose(-1, -2), g.transpose(-1, -2)
    G = g.reshape(n, c, -1, g.shape[-1])
    A = x.reshape(n, -1, x.shape[-1]).detach().to(G.dtype)
    if with_ones is None:
        with_ones = use.bias is not None
    if with_ones:
        A = torch.cat([A, A.new_ones(n, A.shape[1], 1)], dim=2)
    return A, G


def _dense_grads(use: DenseUse, call: Call, params: dict, n: int, c: int) -> dict:
    """{name: (n, c, *shape)} of the weight (and bias) of one dense call, from its patches."""
    A, G = dense_patches(use, call, n, c, with_ones=False)
    equation = "nktg,nta->nkga" if use.cotangent_dim == 0 else "nktg,nta->nkag"
    grads = {use.weight: torch.einsum(equation, G, A)}
    if use.bias is not None:
        grads[use.bias] = G.sum(dim=2)
    return grads


def dense_group(op: ParameterOp, calls: list, params) -> DenseUse | None:
    """The one ``DenseUse`` shared by all ``calls`` of a group that owns exactly its weight
    (and bias), or None: then each call's gradients are formed separately."""
    uses = {dense_use(op, call) for call in calls}
    if len(uses) != 1 or None in uses:
        return None
    use = uses.pop()
    return use if {use.weight, use.bias} - {None} == set(params) else None


def _op_patch_shapes(op: ParameterOp, calls: list) -> list:
    """The factored term's size for a dense group (from the probe's calls, one example),
    which the engine's cost model weighs against materialized per-example gradients; []
    for any other group."""
    use = dense_group(op, calls, dict(op.named_parameters()))
    if use is None:
        return []
    positions = 0
    for call in calls:
        x, feature = _dense_operand(use, call)
        positions += x[:1].numel() // max(x.shape[feature], 1)
    weight = getattr(op, use.weight)
    d_g, d_a = weight.shape if use.cotangent_dim == 0 else weight.shape[::-1]
    return [PatchShape(max(positions, 1), d_a + (use.bias is not None), d_g, 1)]


def _is_group_tensor(op: ParameterOp, value) -> bool:
    """A parameter of the group or one of its shared tensors."""
    return op.owns_parameter(value) or op.shared_tensor(value)


def _only_top_level(op: ParameterOp, args) -> bool:
    """Whether the group's tensors appear among ``args`` only as whole arguments (not inside
    a list or a tuple argument, where the closed forms do not look)."""
    top = sum(_is_group_tensor(op, a) for a in args)
    return top == sum(_is_group_tensor(op, leaf) for leaf in tree_flatten(args)[0])


def closed_form_grads(op: ParameterOp, params: dict, call: Call, n: int, c: int) -> dict | None:
    """{name: (n, c, *shape)} per-example gradients of one recorded call of a common op
    (+, -, * with a broadcast parameter or shared tensor, ``expand``, ``x @ w``, ``w @ x``,
    ``F.linear``, ``F.embedding``), or None when the call is not one of those (then a vjp
    computes them).
    A shared tensor's gradient is pulled back to the parameters through its tape."""
    if len(call.outputs) != 1 or call.output_positions != [0]:
        return None
    if call.raw_args[0] is F.embedding:
        return _embedding_grads(op, params, call, n, c)
    if call.raw_kwargs:
        return None
    func, args = call.raw_args[0], call.raw_args[1:]
    slots = [i for i, a in enumerate(args) if _is_group_tensor(op, a)]
    ids = [id(args[i]) for i in slots]
    names = {op._slot_of[id(args[i])] for i in slots if op.owns_parameter(args[i])}
    if not slots or not _only_top_level(op, args) or len(set(ids)) != len(ids) or not names <= set(params):
        return None  # a tensor twice (p * p), or inside a list: left to the vjp
    if any(isinstance(a, torch.Tensor) and a.is_complex() for a in args):
        return None
    use = dense_use(op, call)
    if use is not None:
        computed = _dense_grads(use, call, params, n, c)
    elif func in _MUL and len(slots) > 1:
        return None  # p * q: each factor is the other's "input"; left to the vjp
    else:
        computed = _elementwise_grads(op, func, args, slots, call.cotangents[0], params)
        if computed is None:
            return None
    grads = {}
    for name, p in params.items():
        grad = computed.get(name)
        if name not in computed:  # a parameter of the group this call does not use
            grad = p.new_zeros(()).expand(n, c, *p.shape)
        if grad is None or tuple(grad.shape) != (n, c, *p.shape):
            return None
        grads[name] = grad.to(p.dtype)
    return grads


_EMBEDDING_OPTIONS = {"padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"}


def _embedding_grads(op: ParameterOp, params: dict, call: Call, n: int, c: int) -> dict | None:
    """``F.embedding(idx, w)`` with idx (n, ...) per example: row v of example i's gradient
    sums the cotangents of the positions that look up v (none at ``padding_idx``). None
    with ``max_norm`` (the lookup renormalizes w in place) or ``scale_grad_by_freq``."""
    args, options = call.raw_args[1:], call.raw_kwargs
    if len(args) != 2 or set(options) - _EMBEDDING_OPTIONS:
        return None
    idx, weight = args
    if options.get("max_norm") is not None or options.get("scale_grad_by_freq"):
        return None
    if (not op.owns_parameter(weight) or weight.dim() != 2 or not isinstance(idx, torch.Tensor)
            or isinstance(idx, nn.Parameter) or idx.dim() == 0 or idx.shape[0] != n):
        return None
    g = call.cotangents[0]
    rows, width = weight.shape
    positions = idx.reshape(n, -1)
    G = g.reshape(n, c, positions.shape[1], width)
    padding = options.get("padding_idx")
    if padding is not None:
        G = G * (positions != padding % rows)[:, None, :, None]
    J = G.new_zeros(n, c, rows, width)
    J.scatter_add_(2, positions[:, None, :, None].expand_as(G), G)
    name = op._slot_of[id(weight)]
    grads = {other: p.new_zeros(()).expand(n, c, *p.shape) for other, p in params.items() if other != name}
    grads[name] = J.to(weight.dtype)
    return grads


def _elementwise_grads(op: ParameterOp, func, args, slots: list, g: torch.Tensor, params: dict) -> dict | None:
    """{name: (n, c, *shape)} of the group tensors at ``slots`` of an elementwise op, summed
    where a parameter enters both directly and through a shared tensor; None if any fails."""
    computed = {}
    for slot in slots:
        tensor = args[slot]
        grad = _elementwise_grad(func, args, slot, g)
        grad = None if grad is None else _sum_to_parameter(grad, tensor)
        if grad is None:
            return None
        if op.owns_parameter(tensor):
            parts = {op._slot_of[id(tensor)]: grad}
        else:
            parts = op.pull_back(tensor, grad, params)
        for name, part in parts.items():
            computed[name] = part if name not in computed else computed[name] + part
    return computed


def _grads_by_vjp(op: ParameterOp, params: dict, call: Call, probe_call: Call | None, n: int, c: int,
                  term_bytes: int | None) -> dict:
    """Per-example gradients of any op: a vjp on each example's slice of the per-example
    arguments, or of the whole op with the cotangent kept on one row."""
    leaves, _ = tree_flatten((call.raw_args, call.raw_kwargs))
    # without the probe's view of the call, a (T, d) table with T = n would be sliced
    # as if per example: masked rows need no such guess
    probe_leaves = None if probe_call is None else tree_flatten((probe_call.raw_args, probe_call.raw_kwargs))[0]
    # the group's shared tensors are never per example, even with a leading size of 1 = n
    shared = op.shared_tensor
    if probe_leaves is not None and len(probe_leaves) == len(leaves) and any(_batched_leaves(leaves, probe_call, n,
                                                                                               shared)):
        try:
            return per_example_grads(op, params, call, n, c, probe_call, shared)
        except (RuntimeError, ValueError):  # the op does not run on one example's slice
            return _masked_rows(op, params, call, n, c, term_bytes)
    return _masked_rows(op, params, call, n, c, term_bytes)


def op_rule(ctx: LayerContext):
    """``ParameterOp``: per-example vjp of each recorded op alone (see the module docstring)."""
    op, n, c = ctx.module, ctx.n, ctx.c
    params = {name: p.detach() for name, p in ctx.params.items()}
    if ctx.form == FACTORED:  # the probe found a dense group, and the cost model chose
        return _factored_dense_terms(op, ctx)
    totals = []
    for call, probe_call in zip(ctx.calls, probe_templates(ctx)):
        if not _is_live(call):
            continue
        grads = closed_form_grads(op, params, call, n, c)
        if grads is None:
            grads = _grads_by_vjp(op, params, call, probe_call, n, c, ctx.term_bytes)
        totals.append(torch.cat([grads[name].reshape(n, c, -1) for name in params], dim=2))
    total = _sum_or_none(totals)
    return [] if total is None else [PerExampleGrads(total)]


def _factored_dense_terms(op: ParameterOp, ctx: LayerContext) -> list:
    """One factored term for a dense group: its calls' patches joined along positions."""
    live = [call for call in ctx.calls if _is_live(call)]
    if not live:
        return []
    use = dense_group(op, live, ctx.params)
    if use is None:
        raise RuntimeError(
            f"the ops using the parameters {sorted(ctx.params)} ({op.extra_repr()}) changed between the "
            "one-example probe and a block of examples (data-dependent control flow), so their Gram terms "
            "cannot be paired; pass conv_form='materialized' to ntk_gram")
    patches = [dense_patches(use, call, ctx.n, ctx.c) for call in live]
    A = torch.cat([a for a, _ in patches], dim=1) if len(patches) > 1 else patches[0][0]
    G = torch.cat([g for _, g in patches], dim=2) if len(patches) > 1 else patches[0][1]
    return [FactoredTerm(A, G)]


op_rule.patch_shapes = _op_patch_shapes
op_rule.needs_grad = True  # torch.func differentiates the op: built after each pass, with grad enabled
register_rule(ParameterOp, op_rule)
