"""Orchestration of the structured NTK Gram: ownership, one forward, batched backward, blocks.

For a block of examples the engine

1. runs one forward pass with hooks (``capture.Recorder``) on every module that owns
   trainable parameters, recording each call's inputs and outputs;
2. runs the c backward passes from the outputs, seeded with the one-hot cotangents e_k
   on every example: batched (``torch.autograd.grad(..., is_grads_batched=True)``) on
   GPUs, a loop on CPU (see ``GramEngine._cotangents``), in chunks of outputs that fit
   the memory budget. Examples are independent, so the gradient of the batch sum with
   respect to a layer output is, row by row, each example's own output cotangent;
3. asks each owner's rule (``rules``) for its Gram terms, and contracts the terms of two
   blocks with the ops of ``fasttangent.kernels`` (``gram``, ``factored_dense_gram``,
   ``factored_conv_gram``) on the requested backend.

Ownership. Each trainable parameter is covered exactly once. A module owns the
parameters it registers itself (``recurse=False``). A parameter whose module is never
called (a parent uses ``child.weight`` directly, as ``nn.MultiheadAttention`` does with
``out_proj``) or that is registered in several modules (tied weights) is handed to the
nearest module that is called and contains all its users; that module gets the
generic torch.func rule for it (unless its rule knows the parameter, as the attention
rule knows ``out_proj.weight``). Parameters left on the generic rule are then offered to
the ops that use them (``ops``): a group of parameters whose every op gives the examples
first is owned by a ``ParameterOp`` and costs one op's vjp per example.

One pass (CPU). Where the backward passes run one output at a time anyway (CPU) and the
Gram is not "full", ``GramEngine.stream_gram`` replaces steps 2-3: per output, one backward
pass, and each layer's terms are built and contracted inside a hook on its recorded
output as soon as the pass reaches it. No part of the backward pass runs twice and each
cotangent lives only while its terms are built. One pass covers all examples (x1 and x2
together for a cross Gram) when its estimated peak (``GramEngine.one_pass_bytes``: what
autograd saves, measured by hooks on the probe's forward pass, plus cotangents and terms
in flight) fits the budget; otherwise examples go in blocks of b, one pass per diagonal
block and one pass over two blocks together per off-diagonal block (``_one_pass_blocks``).

Memory (blocks of the other paths). Everything scales with the block size b: the forward
graph, the cotangents of every recorded output, unfolded patches and materialized
per-example gradients (c·p per example for such layers). ``block_size=None`` takes the
largest b whose estimate for two blocks (a pair) fits ``memory_budget`` (bytes; default
``default_memory_budget``), and the outputs are processed in chunks (all c at once when
they fit; "full" always all at once); the cost model (``cost.py``) keeps each factored
layer's pair temporaries within the same budget. Within a block, terms are streamed:
after the forward pass the recorded outputs are dropped (only their autograd edges are
kept), each layer's cotangents are freed once its terms are built, and each term is
contracted before the next is built; a materialized weight is built in pieces of at most
``term_bytes`` (budget / ``TERM_FRACTION``, at most 16 MiB on CPU). Features of all
blocks are kept when they fit the budget, otherwise recomputed for each block pair. A
symmetric Gram computes block pairs b₁ ≤ b₂ only and mirrors them.
"""
from __future__ import annotations

import contextlib
import itertools
import operator
import os

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .. import kernels
from .capture import Recorder
from .cost import FORMS, choose_form
from . import attention  # noqa: F401  (registers the nn.MultiheadAttention rule)
from .ops import OpRouter, ParameterOp, calls_are_per_example, parameter_groups, parameter_users
from .rules import FactoredTerm, LayerContext, PerExampleGrads, generic_rule, rule_for

CPU_MEMORY_BUDGET = 256 << 20  # when the available host memory cannot be read
CPU_CHUNK_FRACTION = 16  # on CPU, the cotangents of one output chunk take at most budget / 16
TERM_FRACTION = 16  # one materialized term of a block takes at most budget / TERM_FRACTION bytes
# On CPU, pieces larger than this run no faster (the matrix products already reach the sgemm
# rate at 16 MiB operands, measured on 2 cores) but raise the peak, so terms are capped there.
CPU_TERM_BYTES = 16 << 20


def default_memory_budget(device: torch.device) -> int:
    """Bytes the engine plans for when the caller gives none: a quarter of the free memory
    of the CUDA device, or of the available host memory on CPU (256 MiB where that cannot
    be read). The streamed terms take small shares of it (``term_bytes``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    available = _available_host_memory()
    return CPU_MEMORY_BUDGET if available is None else available // 4


def _available_host_memory() -> int | None:
    """Memory this process may still take: MemAvailable from /proc/meminfo (else free
    physical pages), lowered to the cgroup's limit minus its usage inside a memory-limited
    container; None if unknown."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            room = max(int(limit) - usage, 0)
            available = room if available is None else min(available, room)
        break
    return available


def term_bytes(budget: int, device: torch.device) -> int:
    """Bytes one streamed term (a piece of per-example gradients, patches) may take."""
    share = budget // TERM_FRACTION
    return min(share, CPU_TERM_BYTES) if device.type == "cpu" else share


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


# ------------------------------------------------------------------------------------
# Checks (each message says what is wrong and how to fix it).

def check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter of the model requires grad, so the NTK (over trainable parameters) is "
                         "empty; call requires_grad_(True) on the parameters to include")
    for name, module in model.named_modules():
        dropout = (module.p if isinstance(module, nn.modules.dropout._DropoutNd)
                   else module.dropout if isinstance(module, nn.MultiheadAttention) else 0.0)
        if module.training and dropout > 0:
            raise ValueError(f"{type(module).__name__} {name!r} is in training mode with dropout {dropout}: its random "
                             "masks make every forward pass, and so the Gram, random (and not symmetric); call "
                             "model.eval() first")
        if isinstance(module, _NORM_TYPES):
            if module.training:
                raise ValueError(f"BatchNorm {name or type(module).__name__!r} is in training mode: batch statistics "
                                 "couple the examples, so a per-example NTK is undefined; call model.eval() first")
            if not module.track_running_stats:
                raise ValueError(f"BatchNorm {name!r} has track_running_stats=False and so normalizes with batch "
                                 "statistics even in eval mode, coupling the examples; build it with "
                                 "track_running_stats=True (and fill its running statistics)")


def check_inputs(x1, x2) -> None:
    for label, x in (("x1", x1), ("x2", x2)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{label} must be a tensor of shape (n, ...), got {type(x).__name__}")
    if x1.dim() == 0:
        raise ValueError("x1 must have a batch dimension (n, ...); use x.unsqueeze(0) for one example")
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"x1 and x2 must have the same shape beyond the batch dimension, got "
                         f"{tuple(x1.shape)} and {tuple(x2.shape)}; reshape or pad one of them")
    if x2 is not None and x2.device != x1.device:
        raise ValueError(f"x1 is on {x1.device} and x2 on {x2.device}; move them to the model's device")
    if x2 is not None and x2.dtype != x1.dtype:
        raise ValueError(f"x1 is {x1.dtype} and x2 is {x2.dtype}; give both the model's dtype")
    for label, x in (("x1", x1), ("x2", x2)):
        if x is not None and x.shape[0] == 0:
            raise ValueError(f"{label} has no examples (shape {tuple(x.shape)}); pass at least one")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("ntk_gram differentiates the model, which torch.inference_mode() forbids (its "
                           "result would be all zeros); call it outside inference_mode (torch.no_grad is fine)")


def _as_index(value):
    """An int-like option (Python or numpy integer, not bool) as int; other values unchanged."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def output_selection(outputs, c: int):
    """(list of output indices that enter the Gram, whether the result is the full (c, c) Gram)."""
    if isinstance(outputs, str):
        if outputs == "trace":
            return list(range(c)), False
        if outputs == "full":
            return list(range(c)), True
    elif isinstance(outputs, int) and not isinstance(outputs, bool):
        if 0 <= outputs < c:
            return [outputs], False
        raise ValueError(f"outputs={outputs} is out of range for a model with c={c} outputs; "
                         f"use an index in [0, {c - 1}], 'trace' or 'full'")
    raise ValueError(f"outputs={outputs!r} is invalid; use 'trace', 'full' or an output index in [0, {c - 1}]")


def as_matrix(out, n: int) -> torch.Tensor:
    """Model output as (n, c): (n,) is c = 1, (n, *) is flattened."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; ntk_gram needs a tensor output of shape "
                        "(n, c); wrap the model so that it returns one")
    if out.dim() == 0 and n == 1:  # one example through a forward that ends in .squeeze()
        return out.reshape(1, 1)
    if out.dim() == 0 or out.shape[0] != n:
        squeeze = (" (ntk_gram runs the model on single examples too, where a .squeeze() in the forward also "
                   "drops the batch dimension: use .squeeze(-1) or .flatten(1) there)") if n == 1 else ""
        raise ValueError(f"the model output has shape {tuple(out.shape)} for a batch of {n}; it must be (n,) or "
                         f"(n, c); wrap the model so that the first dimension is the batch{squeeze}")
    return out.reshape(n, -1)


def check_finite(f: torch.Tensor) -> None:
    bad = ~torch.isfinite(f)
    if bad.any():
        rows = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
        raise ValueError(f"the model output contains NaN or Inf (examples {rows} of the block); the NTK is "
                         "undefined there: check the inputs and parameters for NaN/Inf or overflow")


# ------------------------------------------------------------------------------------
# Ownership.

def _common_prefix(names):
    parts = [n.split(".") if n else [] for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _parametrized_use(mod_name: str, p_name: str):
    """(module, name relative to it) through which a parameter is used. A parametrization's
    originals (weight_norm, spectral_norm, orthogonal, ...) registered at
    ``<module>.parametrizations.<tensor>`` are used by ``<module>``, whose calls are
    per-example; the parametrization's own call builds the weight once for the whole batch,
    so it cannot own them."""
    parts = mod_name.split(".") if mod_name else []
    if "parametrizations" not in parts:
        return mod_name, p_name
    at = parts.index("parametrizations")
    return ".".join(parts[:at]), ".".join([*parts[at:], p_name])


class ParameterUses(TorchFunctionMode):
    """Records, for each trainable parameter, the stack of module calls active at each of its
    differentiable uses (ops whose result requires grad), during one forward pass.

    Module calls are tracked with global hooks, which run before a module's own pre-hooks,
    so a parameter transformed in a pre-hook (old ``nn.utils.weight_norm``) counts as used
    inside its module."""

    def __init__(self):
        super().__init__()
        self.stack, self.uses = [], {}
        self.together = []  # per use, the ids of the parameters the op uses together
        self._handles = []

    def __enter__(self):
        self._handles = [register_module_forward_pre_hook(lambda m, args: self.stack.append(m)),
                         register_module_forward_hook(lambda m, args, out: self._leave(m), always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return super().__exit__(*exc)

    def _leave(self, module):
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten((args, kwargs))
        params = [t for t in leaves if isinstance(t, nn.Parameter) and t.requires_grad]
        if params and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(out)[0]):
            for p in params:
                self.uses.setdefault(id(p), []).append(tuple(self.stack))
            self.together.append(tuple(id(p) for p in params))
        return out


def _module_names(model: nn.Module) -> tuple:
    """({dotted name: module} over every path, {id(module): its first dotted name})."""
    modules = dict(model.named_modules(remove_duplicate=False))
    names = {}
    for name, module in modules.items():
        names.setdefault(id(module), name)
    return modules, names


def _deepest_common(stacks) -> nn.Module | None:
    """The innermost module call active at every one of the given stacks (root first)."""
    common = None
    for level in zip(*stacks):
        if any(m is not level[0] for m in level):
            break
        common = level[0]
    return common


def plan_ownership(model: nn.Module, called: set, uses: dict | None = None, in_graph: set | None = None):
    """{module: {relative name: Parameter}} and the set of modules forced onto the generic rule.

    A parameter belongs to the module that holds it (the parametrized module for the
    originals of a parametrization) when every use of it (``uses``: id(parameter) -> the
    module stacks of ``ParameterUses``) happens inside a call of that module. A parameter
    used elsewhere too (``F.linear(h, embedding.weight)``, a parent adding ``conv.bias``, a
    weight shared by two modules) belongs to the innermost module call active at all of its
    uses, on the generic rule. A parameter of a called module with no recorded use is left
    out (no gradient) unless ``in_graph`` (ids of the parameters the probe's output depends
    on) shows a use the mode could not see (inside an ``autograd.Function``)."""
    uses = uses or {}
    modules, names = _module_names(model)
    users = {}
    for mod_name, module in modules.items():
        for p_name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                use = _parametrized_use(mod_name, p_name)
                entry = users.setdefault(id(p), (p, []))
                if use not in entry[1]:
                    entry[1].append(use)
    owners, generic = {}, set()
    for p, holders in users.values():
        mod_names = sorted({m for m, _ in holders})
        stacks = uses.get(id(p), [])
        # one module reached by several paths (self.b = self.a) is still one holder
        single = len({id(modules[m]) for m in mod_names}) == 1 and modules[mod_names[0]] in called
        # (a use the probe's mode could not see, inside an autograd.Function, still shows in
        # the graph: ``in_graph``, ids of the parameters the model output depends on)
        if (single and not stacks and (in_graph is None or id(p) not in in_graph)
                and any(id(q) in uses for q in modules[mod_names[0]].parameters(recurse=False))):
            continue  # never used although its module was (swapped out, e.g. by a hypernetwork): no gradient
        if single and any(all(m is not modules[mod_names[0]] for m in stack) for stack in stacks):
            single = False  # used outside its holder's calls
        # modules created inside forward are not the model's: only its own can own
        stacks = [tuple(m for m in stack if id(m) in names) for stack in stacks]
        common = _deepest_common(stacks) if stacks and not single else None
        if common is not None:
            owner_name = names[id(common)]
            while not any(q is p for q in modules[owner_name].parameters()):  # climb to a module holding p
                owner_name = owner_name.rpartition(".")[0]
            rel = next(n for n, q in modules[owner_name].named_parameters(remove_duplicate=False) if q is p)
            # a rule may know a child's parameter that its module uses directly
            # (nn.MultiheadAttention and out_proj.weight); any other goes generic
            if rel not in getattr(rule_for(modules[owner_name]), "parameter_names", ()):
                generic.add(modules[owner_name])
        elif single:
            owner_name, rel = mod_names[0], holders[0][1]
            if rel.startswith("parametrizations."):  # no structured rule knows the originals
                generic.add(modules[owner_name])
        else:
            owner_name = _common_prefix(mod_names)
            while modules[owner_name] not in called and owner_name:
                owner_name = owner_name.rpartition(".")[0]
            first = holders[0]
            rel = ".".join(filter(None, [first[0][len(owner_name):].lstrip("."), first[1]]))
            generic.add(modules[owner_name])
        owners.setdefault(modules[owner_name], {})[rel] = p
    return owners, generic


def _batch_first(calls, structured: bool, n: int = 1) -> bool:
    """Whether the calls of a module on a batch of n examples (the probe: n = 1) carry the
    example index first: every output, and for a structured rule the input, has a leading
    dimension of n."""
    for call in calls:
        if any(len(shape) == 0 or shape[0] != n for shape in call.output_shapes):
            return False
        first = call.inputs[0] if call.inputs else None
        if structured and isinstance(first, torch.Tensor) and (first.dim() == 0 or first.shape[0] != n):
            return False
    return True


def _lift_owners_without_batch_dim(model: nn.Module, owners: dict, generic: set, calls: dict, rule,
                                   n: int = 1, probe_calls: dict | None = None) -> bool:
    """Give the parameters of an owner whose calls do not carry the example index first
    (a time-first sequence layer, a layer on a reshaped (n·T, d) batch, on prototypes or on
    part of the batch, a per-example loop inside the forward, a recurrent layer's (layers,
    n, H) state) to its nearest ancestor whose calls do (the model itself when no recorded
    one does), on the generic rule; the rules would otherwise take the wrong dimension for
    the examples. ``calls``: the recorded calls of a forward pass over n examples. Returns
    whether an owner was lifted."""
    modules, names = _module_names(model)
    lifted = False
    for module in list(owners):
        if isinstance(module, ParameterOp):
            if not calls_are_per_example(module, calls.get(module, []), n, (probe_calls or {}).get(module)):
                module.restore(owners, generic)  # its fallback owners are checked on the next pass
                lifted = True
            continue
        structured = rule(module) is not generic_rule
        if _batch_first(calls.get(module, []), structured, n):
            continue
        lifted = True
        name = names[id(module)]
        ancestor = name
        while ancestor:
            ancestor = ancestor.rpartition(".")[0]
            ancestor_calls = calls.get(modules[ancestor])
            if ancestor_calls and _batch_first(ancestor_calls, False, n):
                break
        params = owners.pop(module)
        generic.discard(module)
        prefix = name[len(ancestor):].lstrip(".")
        target = owners.setdefault(modules[ancestor], {})
        target.update({f"{prefix}.{rel}" if prefix else rel: p for rel, p in params.items()})
        generic.add(modules[ancestor])
    return lifted


class _OwnersChanged(Exception):
    """Raised by a recorded pass that changed the owners after an earlier pass of the same
    Gram (``compute_gram`` starts over)."""


def _differentiates(rule) -> bool:
    """Whether a rule runs torch.func on recorded calls (the generic rule, ``op_rule``): it
    needs grad mode, all of a pass's cotangents, and room for per-example gradients."""
    return rule is generic_rule or getattr(rule, "needs_grad", False)


# sample size -> the permutation settle() runs the sample in: for 2 the swap; for 3 and 4,
# orders that no reversal or cyclic shift of the batch reproduces
_SAMPLE_ORDERS = {2: [1, 0], 3: [1, 0, 2], 4: [1, 2, 0, 3]}


def _spread_sample(x1: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
    """Up to 4 examples spread evenly over x1 followed by x2 (the first example first)."""
    n1 = x1.shape[0]
    n = n1 + (0 if x2 is None else x2.shape[0])
    picks = sorted({0, n // 3, (2 * n) // 3, n - 1})
    return torch.stack([x1[i] if i < n1 else x2[i - n1] for i in picks]).detach()


# Tolerances (relative to the largest entry) for "the same rows": another batch order or size
# changes the rounding (on GPUs float32 may run as TF32: about 1e-3), while rows of another
# example differ at order one. The model's own output is compared more loosely, since some
# models amplify rounding there (f0 + α(f − f0) with a large α).
ROW_RTOL = {8: 1e-6, 4: 1e-2, 2: 5e-2}
OUTPUT_RTOL = {8: 1e-6, 4: 5e-2, 2: 2e-1}


def _rows_match(a: torch.Tensor, b: torch.Tensor, tolerances: dict = ROW_RTOL) -> bool:
    """Equal up to the rounding of a batch in another order or of another size."""
    if a.shape != b.shape or not a.is_floating_point():
        return True
    rtol = tolerances.get(a.element_size(), tolerances[2])
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * float(a.abs().max())))


def _rows_follow_examples(calls, permuted_calls, order) -> bool:
    """Whether the recorded outputs of the sample, run in ``order`` as well, permute their
    rows the same way: row i of every output belongs to example i. Calls that differ in
    number or shape are not compared (the batch-first checks cover them)."""
    if len(calls) != len(permuted_calls):
        return True
    for call, other in zip(calls, permuted_calls):
        for out, out_permuted in zip(call.outputs, other.outputs):
            if out.shape != out_permuted.shape or out.dim() == 0 or out.shape[0] != len(order):
                continue
            if not _rows_match(out.detach()[order], out_permuted.detach()):
                return False
    return True


def _tensor_bytes(tree) -> int:
    """Bytes of the tensors in ``tree``, parameters left out (they do not grow with n: an op
    owning a parameter records it among its arguments)."""
    leaves, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves
               if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter))


# ------------------------------------------------------------------------------------
# The engine.

def _check_no_stale_uses(model: nn.Module, earlier: dict, later: dict) -> None:
    """Refuse a model whose output reaches a parameter through autograd nodes that two
    forward passes share (``earlier``, ``later``: {parameter id: nodes using it}, from
    ``parameter_users``): such a node was made outside the forward pass (``self.wt =
    self.w.t()`` in ``__init__``, a weight cached on an earlier call or by
    ``parametrize.cached()``), and every rule re-runs ops from the parameters, so that path
    would be missed."""
    stale = {pid for pid, nodes in later.items() if nodes & earlier.get(pid, set())}
    if stale:
        names = [name for name, p in model.named_parameters() if id(p) in stale]
        raise ValueError(
            f"the model's output depends on {names} through tensors computed outside the forward pass (e.g. "
            "self.wt = self.w.t() in __init__, a weight cached on an earlier call, parametrize.cached()); a "
            "per-example NTK differentiates the forward pass itself: compute such tensors inside forward")


# rounds of joining op groups whose shared tensors meet (each round joins every such pair)
_JOIN_ROUNDS = 4


class GramEngine:
    """Computes Gram blocks of one model for one output selection (see the module docstring)."""

    def __init__(self, model, *, full: bool, selected, backend: str, memory_budget: int, conv_form: str):
        if conv_form not in FORMS:
            raise ValueError(f"conv_form={conv_form!r} is invalid; use one of {FORMS}")
        self.model = model
        self.full = full
        self.selected = selected
        self.backend = backend
        self.budget = memory_budget
        self.term_bytes = memory_budget // TERM_FRACTION  # set for the device by compute_gram
        self.conv_form = conv_form
        self.owners = {}
        self.generic = set()
        self.forms = {}
        self._probe_graph_users = None  # the probe's {parameter id: nodes}, until the first recorded pass
        self.batched_backward = None  # None: batched on GPU, a loop over outputs on CPU
        self.clone_outputs = False  # set on the first forward that modifies a recorded output in place
        self.cache_inputs = True  # keep unfolded patches across output chunks (set by plan_blocks)
        self.input_bytes_per_example = 0.0
        self.largest_patch_bytes_per_example = 0.0
        self.block = None  # planned examples per block (set by compute_gram)
        # dense layers' input Grams (and their total bytes), kept across the outputs of one pass
        self.input_grams, self.input_gram_bytes = {}, 0
        self.saved_bytes_per_example = 0  # what autograd saves in the forward pass (set by probe)
        self.recorded_once = False  # whether a pass of the current Gram was recorded (see compute_gram)

    @property
    def c(self) -> int:
        return len(self.selected)

    def rule(self, module):
        return generic_rule if module in self.generic else rule_for(module)

    # -- probing ------------------------------------------------------------------
    def probe(self, x: torch.Tensor) -> int:
        """Forward one example: find which modules are called, set ownership, record the
        calls' shapes for ``plan``; return the number of model outputs c."""
        called = set()
        handles = [m.register_forward_hook(lambda mod, i, o: called.add(mod)) for m in self.model.modules()]
        candidates = list(self.model.modules())  # every call, for the batch-first check of ancestors
        state = {_storage_address(t) for t in itertools.chain(self.model.parameters(), self.model.buffers())}
        saved = {}

        def count_saved(t):
            if t.layout == torch.strided and _storage_address(t) not in state:  # state does not grow with n
                saved[(t.data_ptr(), tuple(t.shape), tuple(t.stride()))] = t.numel() * t.element_size()
            return t

        uses = ParameterUses()

        def forward(measure: bool):
            hooks = saved_tensors_hooks(count_saved, lambda t: t) if measure else contextlib.nullcontext()
            uses.uses.clear()
            with Recorder(candidates) as rec, torch.enable_grad(), hooks, uses:
                return rec, self.model(x[:1].detach())

        try:
            try:
                rec, out = forward(measure=True)
                self.saved_bytes_per_example = sum(saved.values())
            except RuntimeError:
                # e.g. torch.func transforms inside the forward refuse saved-tensor hooks:
                # fall back to an estimate from the recorded calls (see one_pass_bytes)
                called.clear()
                rec, out = forward(measure=False)
                self.saved_bytes_per_example = None
        finally:
            for h in handles:
                h.remove()
        graph_users = self._graph_users(out)
        # compared with the first recorded pass's: nodes in both were made outside the forward
        self._probe_graph_users = graph_users
        self.owners, self.generic = plan_ownership(self.model, called, uses.uses, set(graph_users))
        for module, params in self.owners.items():
            known = getattr(rule_for(module), "parameter_names", None)
            # a hook that replaced the arguments or the output: forward alone does not describe the call
            hooks_changed = any(call.hooks_changed for call in rec.calls.get(module, []))
            supported = getattr(rule_for(module), "supports", lambda m: True)(module)
            if hooks_changed or not supported or (known is not None and not set(params) <= known):
                self.generic.add(module)
        self._check_structured_uses(rec.calls, graph_users)
        _lift_owners_without_batch_dim(self.model, self.owners, self.generic, rec.calls, self.rule)
        self._probe_calls = rec.calls
        self._own_by_ops(x, uses.together)
        self._probe_output = as_matrix(out, 1).detach()  # x[:1] alone (``settle`` compares)
        return self._probe_output.shape[1]

    def _graph_users(self, out) -> dict:
        """{id(trainable parameter): the autograd nodes using it} in the graph behind ``out``."""
        trainable = {id(p) for p in self.model.parameters() if p.requires_grad}
        return parameter_users(tree_flatten(out)[0], trainable)

    def _check_structured_uses(self, calls: dict, graph_users: dict) -> None:
        """An owner on a structured rule covers its parameters' uses inside its calls only:
        a use elsewhere that the mode could not see (an ``autograd.Function`` or TorchScript
        outside the module) shows in the graph as a node outside every call; such an
        owner's parameters go to the model itself, on the generic rule."""
        for module in [m for m in self.owners if self.rule(m) is not generic_rule]:
            ids = {id(p) for p in self.owners[module].values()}
            inside = set()
            for call in calls.get(module, []):
                inputs = [t for t in tree_flatten((call.args, call.kwargs, call.raw_args, call.raw_kwargs))[0]
                          if isinstance(t, torch.Tensor)]
                inside.update(*parameter_users(call.outputs, ids, stop=inputs).values())
            if any(node not in inside for pid in ids for node in graph_users.get(pid, ())):
                self._give_to_model(module)

    def _own_by_ops(self, x: torch.Tensor, together: list) -> None:
        """Move the parameters of generic-rule owners to ``ParameterOp`` owners, one per group
        of parameters used together by some op (see ``ops``), and keep the groups whose ops
        give the examples first in a second one-example forward pass; an owner left without
        parameters is dropped. Groups whose shared tensors meet in an op (``v / ‖v‖ * g``)
        are joined and the pass is run again."""
        together = list(together)
        for _ in range(_JOIN_ROUNDS):
            candidates = {id(p): (module, rel, p) for module, params in self.owners.items()
                          if self.rule(module) is generic_rule for rel, p in params.items()}
            if not candidates:
                return
            ops = self._parameter_ops(candidates, together)
            joined = self._keep_per_example_ops(ops, x)
            if not joined:
                return
            for op in ops:  # start again with the joined groups as one
                op.restore(self.owners, self.generic)
            together += joined

    def _parameter_ops(self, candidates: dict, together: list) -> list:
        """One ``ParameterOp`` owner per group of ``candidates`` ({id: (module, name, p)})."""
        ops = []
        for group in parameter_groups(candidates, together):
            params = {f"p{i}": candidates[pid][2] for i, pid in enumerate(group)}
            fallback = {f"p{i}": candidates[pid][:2] for i, pid in enumerate(group)}
            for module, rel in fallback.values():
                del self.owners[module][rel]
            op = ParameterOp(params, fallback)
            self.owners[op] = dict(op.named_parameters())
            ops.append(op)
        for module in [m for m, params in self.owners.items() if not params]:
            del self.owners[module]
            self.generic.discard(module)
        return ops

    def _keep_per_example_ops(self, ops: list, x: torch.Tensor) -> list:
        """Run one example through the model with ``ops`` routed; hand back the groups whose
        ops do not give the examples first or whose parameters have uses no op shows. Return
        the groups joined by an op (tuples of parameter ids), or [] when none were."""
        for op in ops:
            op.trace_nodes = True
        try:
            example = x[:1].detach()
            router = OpRouter(ops, inputs=example)
            with Recorder(ops) as rec, torch.enable_grad(), router:
                out = self.model(example)
            if router.joined:
                return [tuple(id(p) for op in group for p in op.parameters()) for group in router.joined]
            # every use of a group's parameters (and of its shared tensors) in the graph must be
            # one of its ops: a use the mode cannot see (inside an autograd.Function,
            # TorchScript) would be missed
            shared = {op: op.shared_nodes() for op in ops}
            users = parameter_users(tree_flatten(out)[0], {id(p) for op in ops for p in op.parameters()},
                                    targets=set().union(*shared.values()))
            for op in ops:
                op.probe_tape_shapes = op.tape_shapes()
                uses = set().union(*(users.get(key, ()) for key in [id(p) for p in op.parameters()] + list(shared[op])))
                if not calls_are_per_example(op, rec.calls[op], 1) or not uses <= op.covered:
                    op.restore(self.owners, self.generic)
        finally:
            for op in ops:
                op.trace_nodes, op.covered = False, set()
        self._probe_calls.update(rec.calls)
        return []

    def settle(self, x1: torch.Tensor, x2: torch.Tensor | None) -> None:
        """Settle ownership on forward passes over a few examples before any block runs.

        One example cannot tell a per-example result from one shared by the batch (an op on
        a (1, d) parameter alone), and blocks of one example (n = 1, or x1 of one example in
        a cross Gram) never check it: without this, a later block could change the owners
        between two blocks whose terms must match. The sample (up to 4 examples spread over
        x1 and x2) also runs permuted (``_SAMPLE_ORDERS``: orders that neither a reversal nor
        a cyclic shift of the batch reproduces): an owner whose output rows do not follow
        the examples (a forward that sorts, rolls or routes the batch) does not have example i
        in row i, which every rule assumes; it goes to the model itself, on the generic rule.
        The model's own output must follow the examples and, for the first example, equal its
        output alone, or the model is not per-example (random, or coupling the examples)."""
        sample = _spread_sample(x1, x2)
        if sample.shape[0] < 2:
            return
        order = torch.tensor(_SAMPLE_ORDERS[sample.shape[0]], device=sample.device)
        with torch.no_grad():  # the recorded passes enable grad themselves; nothing is kept
            while True:
                self.recorded_once = False  # no terms yet: owners may still change
                rec, f = self._record(sample)
                self.recorded_once = False
                permuted, f_permuted = self._record(sample[order])
                # two passes over the same number of examples: a cache keyed by the batch size
                # (missed by the probe's one example) shows as nodes both graphs share
                _check_no_stale_uses(self.model, self._graph_users(f), self._graph_users(f_permuted))
                # the probe ran the sample's first example (x1[0]) alone: a coupling symmetric in
                # the examples (a batch mean) shows there
                alone = self._probe_output
                if not (_rows_match(f.detach()[order], f_permuted.detach(), OUTPUT_RTOL)
                        and _rows_match(f.detach()[:1], alone, OUTPUT_RTOL)):
                    raise ValueError(
                        "the model's output for one example depends on the other examples of the batch or is "
                        "random (the same examples in another order, or alone, give other outputs); a "
                        "per-example NTK needs a deterministic forward with no coupling between examples: use "
                        "eval mode, no batch statistics, no random ops (a model that amplifies float32 rounding "
                        "this much, e.g. f0 + α(f − f0) with a huge α, needs float64)")
                rows_elsewhere = [m for m in self.owners if m is not self.model
                                  and not _rows_follow_examples(rec.calls[m], permuted.calls[m], order)]
                if not rows_elsewhere:
                    return
                for module in rows_elsewhere:
                    self._give_to_model(module)

    def _give_to_model(self, module) -> None:
        """Move an owner's parameters to the model itself, on the generic rule."""
        params = self.owners.pop(module)
        self.generic.discard(module)
        target = self.owners.setdefault(self.model, {})
        for p in params.values():
            target[next(name for name, q in self.model.named_parameters(remove_duplicate=False) if q is p)] = p
        self.generic.add(self.model)

    def _op_router(self, x: torch.Tensor):
        """Routes the ops of the ``ParameterOp`` owners during a recorded forward pass on x."""
        ops = [m for m in self.owners if isinstance(m, ParameterOp)]
        return OpRouter(ops, inputs=x) if ops else contextlib.nullcontext()

    def one_pass_bytes(self, n: int) -> float:
        """Estimated peak bytes of ``stream_gram`` over n examples (``plan`` must have run):
        the larger of the forward pass (what autograd saves, measured on the probe, plus
        the recorded outputs) and the backward passes: what autograd saves; the two largest
        layer-output cotangents in flight; the cotangents of deferred owners (held until a
        pass ends); the kept unfolded patches (or one layer's); the largest generic-rule
        term (per-example gradients of all the owner's parameters); and two terms."""
        calls = [call for module in self.owners for call in self._probe_calls.get(module, [])]
        outputs = [_tensor_bytes(call.outputs) for call in calls]
        saved = self.saved_bytes_per_example
        if saved is None:  # not measured: inputs and outputs of every call, twice
            saved = 2 * sum(_tensor_bytes(call.args) + _tensor_bytes(call.outputs) for call in calls)
        deferred, generic = 0, 0
        for module, params in self.owners.items():
            calls = self._probe_calls.get(module, [])
            if not self._immediate(module, calls):
                deferred += sum(_tensor_bytes(call.outputs) for call in calls)
            if _differentiates(self.rule(module)):
                generic = max(generic, sum(p.numel() * p.element_size() for p in params.values()))
        patches = self._patch_bytes_kept(n) if self._keeps_patches(n) else n * self.largest_patch_bytes_per_example
        forward = n * (saved + sum(outputs))
        backward = (n * (saved + 2 * max(outputs, default=0) + deferred + generic) + patches
                    + 2 * self.term_bytes)
        return max(forward, backward)

    def _immediate(self, module, calls) -> bool:
        """Whether ``stream_gram`` builds this owner's terms inside its hook (one call, one
        output, a structured rule) rather than after the pass."""
        return not _differentiates(self.rule(module)) and len(calls) == 1 and len(calls[0].outputs) == 1

    def _patch_bytes_kept(self, n: int) -> float:
        return n * self.input_bytes_per_example

    def _keeps_patches(self, n: int) -> bool:
        """Unfolded patches are kept across the outputs of a pass when all of them take at
        most a quarter of the budget (otherwise each layer's are dropped after its terms)."""
        return self._patch_bytes_kept(n) <= self.budget / 4

    def plan(self, n1: int, n2: int, chunk: int) -> tuple:
        """Choose each positions layer's form for blocks (n1, n2) and ``chunk`` outputs at a
        time; return the estimated bytes per example (independent of the outputs, per output)."""
        itemsize = next(iter(next(iter(self.owners.values())).values())).element_size()
        per_example, per_output, patch_bytes, largest_patch = 0.0, 0.0, 0.0, 0.0
        for module, params in self.owners.items():
            calls = self._probe_calls.get(module, [])
            # inputs, outputs and their clones, and ~ one more output's worth that autograd
            # saves between recorded layers (activations, pooling indices)
            per_example += sum(_tensor_bytes(call.args) + 3 * _tensor_bytes(call.outputs) for call in calls)
            per_output += sum(_tensor_bytes(call.outputs) for call in calls)
            n_params = sum(p.numel() for p in params.values())
            shapes = getattr(self.rule(module), "patch_shapes", None)
            layer_shapes = shapes(module, calls) if shapes is not None and calls else []
            if not layer_shapes:  # per-example gradients only
                per_output += n_params * itemsize
                continue
            self.forms[module] = self._choose(layer_shapes, n1, n2, chunk, itemsize)
            layer_patch = sum(shape.positions * shape.d_in * shape.groups * itemsize for shape in layer_shapes)
            largest_patch = max(largest_patch, layer_patch)
            patch_bytes += layer_patch
            per_example += layer_patch
            for shape in layer_shapes:
                if self.forms[module] != "factored":
                    per_output += shape.d_in * shape.d_out * shape.groups * itemsize
        self.input_bytes_per_example = patch_bytes
        self.largest_patch_bytes_per_example = largest_patch
        return per_example, per_output

    def _choose(self, layer_shapes, n1, n2, chunk, itemsize) -> str:
        """One form per module (a rule computes all its weights the same way)."""
        if self.conv_form != "auto":
            return self.conv_form
        forms = [choose_form(shape, n1, n2, chunk, full=self.full, budget_elements=self.budget / itemsize)
                 for shape in layer_shapes]
        return max(set(forms), key=forms.count)

    def output_chunks(self, chunk: int):
        """Positions in ``selected`` grouped ``chunk`` at a time ("full" needs all at once)."""
        chunk = self.c if self.full else chunk
        return [list(range(s, min(s + chunk, self.c))) for s in range(0, self.c, chunk)]

    # -- one block ----------------------------------------------------------------
    def feature_chunks(self, x: torch.Tensor, chunks):
        """Yield, per output chunk and per owner, {(owner index, term index): term} for the
        examples of ``x`` (one dict per owner, possibly empty, so that two blocks' streams
        stay aligned).

        One forward pass; the graph is kept until the last chunk's backward passes. The
        cotangents are computed for groups of owners (``_cotangent_groups``) in turn, and an
        owner's cotangents (and, unless ``cache_inputs``, its unfolded patches) are released
        as soon as its terms are built, so that at most one layer's terms are alive at a time.
        """
        x = x.detach()
        n = x.shape[0]
        rec, f = self._record(x)
        for module in self.owners:
            for call in rec.calls[module]:
                call.check_inputs_unmodified(module)
                call.release_outputs()
        owners = list(self.owners)
        for number, chunk in enumerate(chunks):
            groups = self._cotangent_groups(n, len(chunk))
            for g_number, group in enumerate(groups):
                recorded = [(call, edge) for m in group for call in rec.calls[m] for edge in call.edges]
                last = number + 1 == len(chunks) and g_number + 1 == len(groups)
                with torch.enable_grad():
                    cotangents = self._cotangents(f, [e for _, e in recorded], chunk, retain=not last)
                for call, _ in recorded:
                    call.cotangents = []
                for (call, _), g in zip(recorded, cotangents):
                    call.cotangents.append(None if g is None else g.movedim(0, 1))
                del cotangents
                for module in group:
                    index = owners.index(module)
                    for key, term in self._terms(rec, index, module, n, len(chunk)):
                        yield {key: term}
                        del term
                    for call in rec.calls[module]:
                        call.cotangents = None
                        if not self.cache_inputs:
                            call.cache.clear()

    def _cotangent_groups(self, n: int, c: int) -> list:
        """Owners in consecutive groups whose cotangents (n examples, c outputs) take at most
        budget / ``TERM_FRACTION`` bytes together (a larger owner forms its own group). One
        backward pass per group and output: more groups re-run the upper part of the
        backward pass, fewer hold more cotangents at once."""
        share = self.term_bytes
        groups, size = [[]], 0
        for module in self.owners:
            calls = self._probe_calls.get(module, [])
            bytes_ = n * c * sum(_tensor_bytes(call.outputs) for call in calls)
            if groups[-1] and size + bytes_ > share:
                groups.append([])
                size = 0
            groups[-1].append(module)
            size += bytes_
        return groups

    def _record(self, x: torch.Tensor):
        """Forward pass with the recorder: (recorder, model output (n, c)). Recorded outputs
        are cloned only for models that modify them in place (see ``capture``), found out
        on the first block and remembered."""
        n = x.shape[0]
        with Recorder(self.owners, clone_outputs=self.clone_outputs) as rec, torch.enable_grad(), \
                self._op_router(x):
            f = as_matrix(self.model(x), n)
        rec.active = False
        if rec.outputs_modified():
            self.clone_outputs = True
            del rec, f
            return self._record(x)
        # what one example could not show (a state of shape (layers, n, H), a layer on part
        # of the batch): an owner whose calls here do not have the n examples first is lifted
        if n > 1 and _lift_owners_without_batch_dim(self.model, self.owners, self.generic, rec.calls, self.rule, n,
                                                    self._probe_calls):
            del rec, f
            if self.recorded_once:  # an earlier pass of this Gram built its terms under other owners
                raise _OwnersChanged
            return self._record(x)
        check_finite(f.detach())
        if self._probe_graph_users is not None:
            earlier, self._probe_graph_users = self._probe_graph_users, None  # once: the walk costs a pass
            _check_no_stale_uses(self.model, earlier, self._graph_users(f))
        self.recorded_once = True
        return rec, f

    def _terms(self, rec, index: int, module, n: int, c: int):
        """Yield ((owner index, term index), term) of one owner, building each term only when
        the previous one has been contracted (rules may return generators)."""
        ctx = LayerContext(module=module, calls=rec.calls[module], params=self.owners[module], n=n, c=c,
                           probe_calls=self._probe_calls.get(module),
                           form=self.forms.get(module), block=self.block, term_bytes=self.term_bytes)
        rule = self.rule(module)
        mode = torch.enable_grad if _differentiates(rule) else torch.no_grad
        with mode():
            terms = iter(rule(ctx))
        for t_index in itertools.count():
            with mode():  # around each step: a generator rule runs its body inside next()
                term = next(terms, None)
            if term is None:
                return
            yield (index, t_index), term
            del term  # not alive while the next term is built

    def _cotangents(self, f: torch.Tensor, outs: list, chunk: list, retain: bool):
        """Per recorded output, d(Σ_i f[i, k]) / d out for the outputs k of ``chunk``: (c, n, ...).

        The backward passes run batched (``is_grads_batched``, a vmap over the seeds e_k)
        on GPUs. On CPU they run as a loop: there, several backward ops (max-pool,
        convolution) have no efficient vmap rule and the batched pass measured ~2x slower.
        """
        if not outs or not f.requires_grad:
            return [None] * len(outs)
        f_sel = f[:, [self.selected[k] for k in chunk]]
        eye = torch.eye(len(chunk), dtype=f.dtype, device=f.device)
        seeds = eye.unsqueeze(1).expand(len(chunk), f.shape[0], len(chunk))
        if self.backward_is_batched(f.device) and len(chunk) > 1:
            return torch.autograd.grad(f_sel, outs, grad_outputs=seeds, is_grads_batched=True, allow_unused=True,
                                       retain_graph=retain)
        stacked = [None] * len(outs)
        for k in range(len(chunk)):
            grads = torch.autograd.grad(f_sel, outs, grad_outputs=seeds[k], allow_unused=True,
                                        retain_graph=retain or k + 1 < len(chunk))
            if len(chunk) == 1:
                return [None if g is None else g.unsqueeze(0) for g in grads]
            for i, g in enumerate(grads):  # copied into place: one output's grads alive besides the result
                if g is not None:
                    if stacked[i] is None:
                        stacked[i] = g.new_empty((len(chunk), *g.shape))
                    stacked[i][k] = g
        return stacked

    def backward_is_batched(self, device: torch.device) -> bool:
        """Batched (vmap) backward over outputs on GPUs, a loop on CPU (see ``_cotangents``)."""
        return self.batched_backward if self.batched_backward is not None else device.type != "cpu"

    # -- one pass over all examples, terms contracted as the backward passes reach them --
    def stream_gram(self, x: torch.Tensor, K: torch.Tensor, split: int | None = None) -> torch.Tensor:
        """Add the Gram of the examples ``x`` into K, one output at a time, in a single pass.

        One forward pass; then per selected output one backward pass, and each layer's
        terms are built and contracted inside a hook on its recorded output, as soon as
        the backward pass produces that output's cotangent. So every layer's cotangent
        lives only while its terms are built, and no part of the backward pass is run
        twice. The backward passes only go as far as the lowest recorded outputs
        (``_sink_edges``). Modules called several times, with several outputs, or on the
        generic rule get their terms after the pass (they need all their cotangents).

        ``split=None``: K (n, n) is the symmetric Gram of x. Otherwise x = cat(x1, x2) with
        x1 = x[:split], and K (split, n - split) is the cross Gram between them.
        """
        x = x.detach()
        n = x.shape[0]
        rec, f = self._record(x)
        owners = list(self.owners)
        handles, deferred = [], []
        self.input_grams, self.input_gram_bytes = {}, 0
        keep_patches = self._keeps_patches(n)
        try:
            for index, module in enumerate(owners):
                calls = rec.calls[module]
                immediate = self._immediate(module, calls)
                if not immediate:
                    deferred.append((index, module))
                for call in calls:
                    call.check_inputs_unmodified(module)
                    call.cotangents = [None] * len(call.outputs)
                    for position, out in enumerate(call.outputs):
                        hook = self._stream_hook(rec, index, module, call, position, immediate, K, split,
                                                 keep_patches)
                        handles.append(out.register_hook(hook))
                    call.release_outputs()
            if not f.requires_grad:  # no trainable parameter reaches the output: K stays 0
                return K
            sinks = _sink_edges([edge for m in owners for call in rec.calls[m] for edge in call.edges])
            for number, k in enumerate(self.selected):
                with torch.enable_grad():  # the caller may be under no_grad
                    f_k = f[:, k]
                    torch.autograd.grad(f_k, sinks, grad_outputs=torch.ones_like(f_k), allow_unused=True,
                                        retain_graph=number + 1 < self.c)
                for index, module in deferred:
                    self._contract_layer(rec, index, module, n, K, split)
                    for call in rec.calls[module]:
                        call.cotangents = [None] * len(call.cotangents)
                        if not keep_patches:
                            call.cache.clear()
        finally:
            for handle in handles:
                handle.remove()
            self.input_grams, self.input_gram_bytes = {}, 0
        return K

    def _stream_hook(self, rec, index, module, call, position, immediate, K, split, keep_patches):
        def on_cotangent(g):
            call.cotangents[position] = g.detach().unsqueeze(1)  # (n, c = 1, ...)
            if immediate:
                self._contract_layer(rec, index, module, g.shape[0], K, split)
                call.cotangents[position] = None
                if not keep_patches:
                    call.cache.clear()
            # returns None: the gradient flows on unchanged
        return on_cotangent

    def _contract_layer(self, rec, index: int, module, n: int, K, split) -> None:
        """Build one owner's terms (c = 1) and add each into K before building the next."""
        for key, term in self._terms(rec, index, module, n, 1):
            if isinstance(term, FactoredTerm) and term.inputs.shape[1] == 1:
                self._add_dense_factored(key, term, K, split)
            elif split is None:
                self.contract({key: term}, None, K)
            else:
                self.contract({key: _rows(term, slice(0, split))}, {key: _rows(term, slice(split, None))}, K)
            del term

    def _add_dense_factored(self, key, term: FactoredTerm, K, split) -> None:
        """K += (A₁A₂ᵀ) ∘ (g₁g₂ᵀ) for a dense weight (one position, one output). The input
        Gram A₁A₂ᵀ is the same for every output, so it is computed on the first output and
        kept (``self.input_grams``) while the kept ones take at most one term's bytes."""
        A, G = term.inputs[:, 0], term.cotangents[:, 0, 0]
        A1, A2 = (A, A) if split is None else (A[:split], A[split:])
        G1, G2 = (G, G) if split is None else (G[:split], G[split:])
        AA = self.input_grams.get(key)
        if AA is None:
            AA = A1.to(K.dtype) @ A2.to(K.dtype).T
            size = AA.numel() * AA.element_size()
            if self.input_gram_bytes + size <= self.term_bytes:  # a running total: many groups
                self.input_grams[key] = AA
                self.input_gram_bytes += size
        K += AA * (G1.to(K.dtype) @ G2.to(K.dtype).T)

    # -- a pair of blocks -----------------------------------------------------------
    def contract(self, feats1: dict, feats2: dict | None, K: torch.Tensor) -> torch.Tensor:
        """Add the Gram block between two feature sets into K (n1, n2[, c, c]);
        ``feats2=None`` is the symmetric block of ``feats1`` with itself."""
        for key, t1 in feats1.items():
            t2 = None if feats2 is None else feats2.get(key)
            if feats2 is not None and t2 is None:
                continue
            if isinstance(t1, PerExampleGrads):
                self._add_per_example(K, t1.grads, None if t2 is None else t2.grads)
            elif isinstance(t1, FactoredTerm):
                A2, G2 = (None, None) if t2 is None else (t2.inputs, t2.cotangents)
                self._add_factored(K, t1.inputs, t1.cotangents, A2, G2)
            else:
                raise TypeError(f"a rule returned {type(t1).__name__}; rules must return PerExampleGrads or "
                                "FactoredTerm terms")
        return K

    def _add_per_example(self, K, J1, J2):
        n1, c = J1.shape[0], J1.shape[1]
        if not self.full:
            kernels.gram(J1.reshape(n1, -1), None if J2 is None else J2.reshape(J2.shape[0], -1),
                         out=K, backend=self.backend)
            return
        n2 = n1 if J2 is None else J2.shape[0]
        block = kernels.gram(J1.reshape(n1 * c, -1), None if J2 is None else J2.reshape(n2 * c, -1),
                             backend=self.backend)
        K += block.view(n1, c, n2, c).permute(0, 2, 1, 3).to(K.dtype)

    def _add_factored(self, K, A1, G1, A2, G2):
        if not self.full:
            if A1.shape[1] == 1 and (A2 is None or A2.shape[1] == 1):
                kernels.factored_dense_gram(A1[:, 0], G1[:, :, 0], None if A2 is None else A2[:, 0],
                                            None if G2 is None else G2[:, :, 0], out=K, backend=self.backend)
            else:
                kernels.factored_conv_gram(A1, G1, A2, G2, out=K, backend=self.backend)
            return
        K += factored_full_gram(A1, G1, A2, G2).to(K.dtype)


def _storage_address(t: torch.Tensor):
    """Address of a strided tensor's storage (None for sparse and other layouts)."""
    return t.untyped_storage().data_ptr() if t.layout == torch.strided else None


def _rows(term, rows: slice):
    """The examples ``rows`` of a term."""
    if isinstance(term, PerExampleGrads):
        return PerExampleGrads(term.grads[rows])
    if isinstance(term, FactoredTerm):
        return FactoredTerm(term.inputs[rows], term.cotangents[rows])
    raise TypeError(f"a rule returned {type(term).__name__}; rules must return PerExampleGrads or FactoredTerm terms")


def _sink_edges(edges: list) -> list:
    """The recorded edges below which no other recorded edge lies in the autograd graph.

    A backward pass asked for just these still computes the cotangent of every recorded
    output on the way (their hooks fire), but returns only the sinks' cotangents instead
    of holding all of them until it ends."""
    recorded = {edge.node for edge in edges}
    reaches = {}  # node -> whether a recorded node lies strictly below it
    for edge in edges:
        stack = [(edge.node, False)]
        while stack:
            node, expanded = stack.pop()
            if node in reaches:
                continue
            children = [child for child, _ in node.next_functions if child is not None]
            if not expanded:
                stack.append((node, True))
                stack.extend((child, False) for child in children if child not in reaches)
            else:
                reaches[node] = any(child in recorded or reaches.get(child, False) for child in children)
    return [edge for edge in edges if not reaches[edge.node]]


def factored_full_gram(A1, G1, A2=None, G2=None) -> torch.Tensor:
    """K[i, j, a, b] = Σ_{t,s} (A1[i,t]·A2[j,s]) (G1[i,a,t]·G2[j,b,s]), shape (n1, n2, c, c).

    The full (c × c) counterpart of ``kernels.factored_conv_gram``, composed of torch ops:
    AAᵢⱼ = Aᵢ Aⱼᵀ, then Σ_t G1[i,a,t] · (AAᵢⱼ G2[j,b])[t].
    """
    A2 = A1 if A2 is None else A2
    G2 = G1 if G2 is None else G2
    acc = torch.promote_types(A1.dtype, torch.float32)
    A1, G1, A2, G2 = (t.to(acc) for t in (A1, G1, A2, G2))
    if A1.shape[1] == 1 and A2.shape[1] == 1:
        n1, c = G1.shape[:2]
        n2 = G2.shape[0]
        AA = A1[:, 0] @ A2[:, 0].T
        GG = (G1[:, :, 0].reshape(n1 * c, -1) @ G2[:, :, 0].reshape(n2 * c, -1).T).view(n1, c, n2, c)
        return AA[:, :, None, None] * GG.permute(0, 2, 1, 3)
    AA = torch.einsum("itd,jsd->ijts", A1, A2)
    moved = torch.einsum("ijts,jbse->ijbte", AA, G2)
    return torch.einsum("ijbte,iate->ijab", moved, G1)


def plan_blocks(engine, n1: int, n2: int, symmetric: bool, block_size, memory_budget: int,
                one_output_at_a_time: bool = False):
    """(block size for x1, for x2, outputs per chunk) within the memory budget.

    Memory ≈ (blocks alive) · b · (per_example + chunk · per_output): one block alive for
    a symmetric Gram in a single block, two otherwise. The block is the whole input when
    one output at a time fits, otherwise the largest (halving) that does; the chunk is then
    as many outputs as fit ("full" needs all c together). ``one_output_at_a_time`` (the
    CPU, whose backward passes run one output at a time anyway) caps the chunk's
    cotangents at budget / ``CPU_CHUNK_FRACTION``.
    """
    def fits(b, chunk):
        alive = 1 if symmetric and b >= n1 else 2
        per_example, per_output = engine.plan(b, b if symmetric else min(b, n2), chunk)
        return alive * b * (per_example + chunk * per_output) <= memory_budget

    least = engine.c if engine.full else 1
    if block_size is not None:
        b = block_size
    else:
        b = max(n1, n2)
        while b > 1 and not fits(b, least):
            b = max(1, b // 2)
    # Grow the chunk only while the layer forms stay those chosen for the smallest chunk:
    # a form switched merely to squeeze more outputs into memory is the slower one.
    fits(b, least)
    forms = dict(engine.forms)
    chunk = engine.c
    while chunk > least and not (fits(b, chunk) and engine.forms == forms):
        chunk = max(least, chunk // 2)
    if one_output_at_a_time:
        # more outputs per chunk only save recomputing the layers' input products (A Aᵀ),
        # so the chunk's cotangents get a small share of the budget
        _, per_output = engine.plan(b, b if symmetric else min(b, n2), least)
        share = memory_budget // CPU_CHUNK_FRACTION
        chunk = max(least, min(chunk, int(share // max(b * per_output, 1))))
        engine.plan(b, b if symmetric else min(b, n2), chunk)
    return min(b, n1), min(b, n2), chunk


def compute_gram(model, x1, x2, *, outputs, backend, block_size, reduce, memory_budget, conv_form):
    """The engine behind ``fasttangent.ntk_gram`` (argument checks, blocks, symmetry)."""
    check_model(model)
    check_inputs(x1, x2)
    outputs, block_size = _as_index(outputs), _as_index(block_size)
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce={reduce!r} is invalid; use 'sum' or 'mean'")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if memory_budget is None:
        memory_budget = default_memory_budget(x1.device)
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    engine = GramEngine(model, full=False, selected=[0], backend=backend, memory_budget=memory_budget,
                        conv_form=conv_form)
    engine.term_bytes = term_bytes(memory_budget, x1.device)
    c_total = engine.probe(x1)
    engine.settle(x1, x2)
    engine.selected, engine.full = output_selection(outputs, c_total)
    if engine.full and reduce == "mean":
        raise ValueError("reduce='mean' averages the trace over outputs; a full Gram keeps every output pair, "
                         "so use reduce='sum' (the default) with outputs='full'")
    dtype = torch.promote_types(next(p for p in model.parameters() if p.requires_grad).dtype, torch.float32)
    # A block can still show what earlier ones did not (an op on a sub-batch that happened to
    # be the whole of the first block): the owners then change, and terms of blocks recorded
    # under different owners must not meet, so the Gram is computed again from the start.
    # Owners only ever move up (to an ancestor, or from an op back to its module): this ends.
    while True:
        engine.recorded_once = False
        try:
            return _settled_gram(engine, x1, x2, dtype, block_size, reduce, memory_budget)
        except _OwnersChanged:
            continue


def _settled_gram(engine, x1, x2, dtype, block_size, reduce, memory_budget):
    """The Gram under the engine's current owners (see ``compute_gram``)."""
    symmetric = x2 is None
    n1 = x1.shape[0]
    n2 = n1 if symmetric else x2.shape[0]
    looped = not engine.backward_is_batched(x1.device)
    if looped and not engine.full:
        K = _one_pass_blocks(engine, x1, x2, dtype, block_size, memory_budget)
        return K / engine.c if reduce == "mean" else K
    b1, b2, chunk = plan_blocks(engine, n1, n2, symmetric, block_size, memory_budget, one_output_at_a_time=looped)
    chunks = engine.output_chunks(chunk)
    engine.block = max(b1, b2)
    blocks1 = _blocks(n1, b1)
    blocks2 = blocks1 if symmetric else _blocks(n2, b2)
    per_example, per_output = engine.plan(b1, b2, chunk)
    all_features = (n1 + (0 if symmetric else n2)) * (per_example + engine.c * per_output)
    keep_all = len(chunks) == 1 and all_features <= memory_budget
    # patches re-used by the later output chunks of a block, when they take little of the budget
    engine.cache_inputs = len(chunks) > 1 and max(b1, b2) * engine.input_bytes_per_example <= memory_budget / 4
    # a block needed once (one block per side) is streamed layer by layer, never kept whole
    single_use = len(blocks1) == 1 and len(blocks2) == 1

    shape = (n1, n2, engine.c, engine.c) if engine.full else (n1, n2)
    K = torch.zeros(shape, dtype=dtype, device=x1.device)
    cache, last = {}, {}

    def block_chunks(side, index):
        """Per-chunk, per-layer features of one block: a list when there is a single chunk
        and the block is asked for again (kept for all blocks when they fit the budget, else
        the latest block is kept: the symmetric loop asks for block i again right after
        finishing row i - 1); a fresh stream (one forward, then the chunks' backward
        passes) otherwise."""
        key = (side, index)
        if key in cache:
            return cache[key]
        if key in last:
            return last[key]
        x, blocks = (x1, blocks1) if side == 1 else (x2, blocks2)
        stream = engine.feature_chunks(x[blocks[index]], chunks)
        if len(chunks) > 1 or single_use:
            return stream
        feats = list(stream)
        if keep_all:
            cache[key] = feats
        else:
            last.clear()
            last[key] = feats
        return feats

    def fill(i, j, block):
        if symmetric and i == j:
            for feats in block_chunks(1, i):
                engine.contract(feats, None, block)
                del feats  # not alive while the stream builds the next term
        else:
            for feats1, feats2 in zip(block_chunks(1, i), block_chunks(1 if symmetric else 2, j)):
                engine.contract(feats1, feats2, block)
                del feats1, feats2

    _fill_block_pairs(K, blocks1, blocks2, symmetric, fill)
    if reduce == "mean" and not engine.full:
        K /= engine.c
    return K


def _one_pass_blocks(engine, x1, x2, dtype, block_size, memory_budget: int) -> torch.Tensor:
    """The Gram from passes of ``GramEngine.stream_gram`` (CPU, where the backward passes run
    one output at a time): a single pass over all examples (x1 and x2 together for a cross
    Gram) when its estimated peak (``one_pass_bytes``) fits the budget; otherwise blocks of
    b examples, with one pass per diagonal block of a symmetric Gram and one pass over two
    blocks together (split) per off-diagonal block, b the largest block size (halving) for
    which a pass over two blocks fits (a short x2 stays whole: train × a few test points)."""
    symmetric = x2 is None
    n1 = x1.shape[0]
    n2 = n1 if symmetric else x2.shape[0]
    engine.plan(n1, n2, 1)

    def pass_fits(b: int) -> bool:
        size = min(b, n1) if symmetric and b >= n1 else min(b, n1) + min(b, n2)
        return engine.one_pass_bytes(size) <= memory_budget

    if block_size is None:
        b = max(n1, n2)
        while b > 1 and not pass_fits(b):
            b = max(1, b // 2)
    else:
        b = block_size
    blocks1 = _blocks(n1, b)
    blocks2 = blocks1 if symmetric else _blocks(n2, b)
    engine.plan(min(b, n1), min(b, n2), 1)
    K = torch.zeros((n1, n2), dtype=dtype, device=x1.device)
    x_other = x1 if symmetric else x2

    def fill(i, j, block):
        size1 = block.shape[0]
        if symmetric and i == j:
            engine.block = size1
            engine.stream_gram(x1[blocks1[i]], block)
        else:
            engine.block = size1 + block.shape[1]
            engine.stream_gram(torch.cat([x1[blocks1[i]], x_other[blocks2[j]]]), block, split=size1)

    return _fill_block_pairs(K, blocks1, blocks2, symmetric, fill)


def _blocks(n: int, b: int) -> list:
    """Slices of b consecutive examples covering range(n) (the last one may be shorter)."""
    return [slice(s, min(s + b, n)) for s in range(0, n, b)]


def _fill_block_pairs(K: torch.Tensor, blocks1: list, blocks2: list, symmetric: bool, fill) -> torch.Tensor:
    """Build K (n1, n2[, c, c]) block by block: ``fill(i, j, block)`` adds the Gram between
    blocks1[i] and blocks2[j] into a zeroed block. A symmetric Gram computes the pairs
    i <= j only and mirrors the others (swapping the output axes of a full Gram too)."""
    for i, s1 in enumerate(blocks1):
        for j, s2 in enumerate(blocks2):
            if symmetric and j < i:
                continue
            block = K.new_zeros((s1.stop - s1.start, s2.stop - s2.start, *K.shape[2:]))
            fill(i, j, block)
            K[s1, s2] = block
            if symmetric and i != j:
                K[s2, s1] = block.transpose(0, 1).transpose(2, 3) if block.dim() == 4 else block.T
    return K
