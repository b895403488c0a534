"""Per-layer rules: turn a layer's recorded inputs and output cotangents into Gram terms.

A rule is a callable ``rule(ctx: LayerContext) -> list of terms``. A term is either

- ``PerExampleGrads(J)`` with J (n, c, p): per-example, per-output gradients of some of
  the layer's parameters (flattened in any fixed order); its Gram term is J₁ J₂ᵀ;
- ``FactoredTerm(A, G)`` with A (n, T, d_in), G (n, c, T, d_out): a weight whose
  per-example gradient is Gᵢₖᵀ Aᵢ; its Gram term is Σ_k ⟨Aᵢ Aⱼᵀ, Gᵢₖ Gⱼₖᵀ⟩_F
  (computed without materializing the gradient).

Rules are looked up by module type (``register_rule``); a type whose ``forward`` is
inherited unchanged from a registered type uses that type's rule. Modules without a
rule fall back to ``generic_rule`` (per-example torch.func over the module alone).

A rule that sets ``rule.patch_shapes(module, calls) -> list[PatchShape]`` takes part in
the cost model: the engine then passes the chosen form in ``ctx.form``.

Weight sharing: a module called several times has one ``Call`` per call; the gradient
of a shared parameter is the sum over calls, which the rules get by treating the calls
as extra positions (factored) or by summing per-call gradients (materialized).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._functional import call_with
from .capture import Call
from .cost import FACTORED, PatchShape


@dataclasses.dataclass
class PerExampleGrads:
    """J (n, c, p): per-example, per-output gradient of some parameters."""

    grads: torch.Tensor


@dataclasses.dataclass
class FactoredTerm:
    """A (n, T, d_in) inputs and G (n, c, T, d_out) output cotangents of a positions weight."""

    inputs: torch.Tensor
    cotangents: torch.Tensor


@dataclasses.dataclass
class LayerContext:
    """What a rule sees: the module, its recorded calls (``call.cotangents`` filled, each
    (n, c, *output.shape[1:]) or None), the trainable parameters it must cover (name
    relative to ``module`` -> Parameter), the block size n, the number c of model
    outputs in the Gram, the form chosen by the cost model (None for rules without
    ``patch_shapes``), and the planned block size ``block`` (>= n) with the bytes
    ``term_bytes`` one materialized term of such a block may take (None: no limit). A rule
    may return its terms as a generator; the engine then contracts each term before the
    next one is built."""

    module: nn.Module
    calls: list
    params: dict
    n: int
    c: int
    form: str | None = None
    block: int | None = None
    term_bytes: int | None = None
    probe_calls: list | None = None


_RULES: dict = {}


def register_rule(module_type: type, rule) -> None:
    """Use ``rule(ctx) -> list[PerExampleGrads | FactoredTerm]`` for modules of ``module_type``.

    The rule must cover exactly the parameters in ``ctx.params``; give it an attribute
    ``rule.parameter_names`` (a set of names) and modules holding any other parameter take
    the generic rule instead. Registering again for the same type replaces the previous rule.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_rule needs an nn.Module subclass, got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"a rule must be callable as rule(ctx) -> list of terms, got {rule!r}")
    _RULES[module_type] = rule


def rule_for(module: nn.Module):
    """The rule of ``module``'s type or of the nearest registered base class whose forward it
    inherits unchanged; ``generic_rule`` otherwise."""
    for base in type(module).__mro__:
        if base in _RULES and type(module).forward is base.forward:
            return _RULES[base]
    return generic_rule


def _live_calls(ctx: LayerContext):
    """Calls whose output reaches the model output (others contribute nothing)."""
    return [call for call in ctx.calls if call.cotangents and call.cotangents[0] is not None]


def _sum_or_none(tensors):
    tensors = list(tensors)
    return functools.reduce(torch.add, tensors) if tensors else None


# ----------------------------------------------------------------------------------------
# Positions layers: Linear (any number of leading dims) and Conv1d / Conv2d.

def _weight_terms(ctx: LayerContext, patches, groups: int):
    """Terms of a positions weight from per-call (A (n, T, g·d_in), G (n, c, g·d_out, T)).

    G is kept channels-first (the layout the backward pass produces), which is what the
    materialized batched matmul wants; the factored term gets a transposed view.
    """
    if not patches:
        return []
    A = torch.cat([a for a, _ in patches], dim=1) if len(patches) > 1 else patches[0][0]
    G = torch.cat([g for _, g in patches], dim=3) if len(patches) > 1 else patches[0][1]
    n, T, c = A.shape[0], A.shape[1], G.shape[1]
    if ctx.form == FACTORED:
        A_g = A.reshape(n, T, groups, -1)
        G_g = G.reshape(n, c, groups, -1, T)
        return [FactoredTerm(A_g[:, :, gi], G_g[:, :, gi].transpose(2, 3)) for gi in range(groups)]
    # Materialized: Jᵢₖ = Gᵢₖᵀ Aᵢ per group, one batched matmul over (example, group).
    if groups == 1:
        return _materialized_pieces(ctx, A, G)
    A_b = A.reshape(n, T, groups, -1).permute(0, 2, 1, 3).reshape(n * groups, T, -1)
    G_b = G.reshape(n, c, groups, -1, T).transpose(1, 2).reshape(n * groups, -1, T)
    J = torch.bmm(G_b, A_b).reshape(n, groups, c, -1)
    return [PerExampleGrads(J.transpose(1, 2).reshape(n, c, -1))]


def _even_step(size: int, most: int) -> int:
    """Piece length for splitting ``size`` items into the fewest pieces of at most ``most``
    items: ceil(size / pieces), so that pieces come out about equal when the count allows
    (64 by at most 56: 32 + 32 rather than 56 + 8); the last piece may still be shorter."""
    most = max(1, min(size, most))
    return -(-size // -(-size // most))


def _materialized_pieces(ctx: LayerContext, A, G):
    """Jᵢₖ = Gᵢₖᵀ Aᵢ (ungrouped weight) in pieces of output channels, each within
    ``ctx.term_bytes`` for the planned block: the Gram is the sum of the pieces' Grams,
    and only one piece need be alive. The number of pieces depends on the planned block,
    not on n, so that the term streams of two blocks stay aligned."""
    n, c, d_out, T = G.shape
    d_in = A.shape[2]
    per_channel = (ctx.block or n) * c * d_in * A.element_size()
    step = d_out if ctx.term_bytes is None else _even_step(d_out, ctx.term_bytes // per_channel)
    if step >= d_out:
        return [PerExampleGrads(torch.bmm(G.reshape(n, c * d_out, T), A).reshape(n, c, -1))]
    return (PerExampleGrads(torch.bmm(G[:, :, s:s + step].reshape(n, -1, T), A).reshape(n, c, -1))
            for s in range(0, d_out, step))


def _bias_term(patches):
    if not patches:
        return []
    return [PerExampleGrads(_sum_or_none(g.sum(dim=3) for _, g in patches))]


def _linear_patches(ctx: LayerContext, with_ones: bool = False):
    """(A (n, T, d_in), G (n, c, d_out, T)) per live call; T = product of middle dims.
    ``with_ones``: a column of ones appended to A, the factored term of [W | b] (per-example
    gradient Σ_t g_t ⊗ [a_t, 1]), so that G Gᵀ is formed once for both; kept in the call's
    cache across the outputs of a block (one copy of the input, not one per output)."""
    patches = []
    for call in _live_calls(ctx):
        x, g = call.inputs[0], call.cotangents[0]
        n, c = g.shape[0], g.shape[1]
        A = x.reshape(n, -1, x.shape[-1])
        if with_ones:
            if "with_ones" not in call.cache:
                call.cache["with_ones"] = torch.cat([A, A.new_ones(*A.shape[:2], 1)], dim=2)
            A = call.cache["with_ones"]
        patches.append((A, g.reshape(n, c, -1, g.shape[-1]).transpose(2, 3)))
    return patches


def linear_rule(ctx: LayerContext):
    """nn.Linear: weight by the cost model (T = 1 is always factored: (aᵢ·aⱼ)(gᵢ·gⱼ)), bias Σ_t g.
    In the factored form the bias rides along as a column of ones in A: (aᵢ·aⱼ + 1)(gᵢ·gⱼ)."""
    if ctx.form == FACTORED and "weight" in ctx.params and "bias" in ctx.params:
        return _weight_terms(ctx, _linear_patches(ctx, with_ones=True), groups=1)
    patches = _linear_patches(ctx)
    bias = _bias_term(patches) if "bias" in ctx.params else []
    weight = _weight_terms(ctx, patches, groups=1) if "weight" in ctx.params else []
    return itertools.chain(bias, weight)  # lazily: the weight's pieces one at a time


def _linear_shapes(module: nn.Linear, calls):
    positions = sum(call.inputs[0][:1].numel() // module.in_features for call in calls)
    return [PatchShape(max(positions, 1), module.in_features, module.out_features, 1)]


linear_rule.patch_shapes = _linear_shapes


def _conv_geometry(module):
    """(explicit pre-padding or None, unfold padding) matching the module's own padding."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return (module._reversed_padding_repeated_twice, mode), 0
    return None, module.padding


def _windows(module, x, channels_last: bool = False):
    """Input patches of a Conv1d / Conv2d as a strided view of the (padded) input, matching
    the module's own padding: (n, H_out, W_out, C_in, kh, kw), or with ``channels_last``
    (n, H_out, W_out, kh, kw, C_in) over a channels-last copy of the input, where one
    kernel row of a window is a single contiguous run of kw·C_in values (Conv1d: H = kh = 1)."""
    pre_pad, padding = _conv_geometry(module)
    if pre_pad is not None:
        x = F.pad(x, pre_pad[0], mode=pre_pad[1])
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(padding, int):
        padding = (padding,) * len(kernel)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride, padding = (1, *kernel), (1, *dilation), (1, *stride), (0, *padding)
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    n, C, H, W = x.shape
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    H_out = (H - dh * (kh - 1) - 1) // sh + 1
    W_out = (W - dw * (kw - 1) - 1) // sw + 1
    if channels_last:
        x = x.permute(0, 2, 3, 1).contiguous()
        s_n, s_h, s_w, s_c = x.stride()
        return x.as_strided((n, H_out, W_out, kh, kw, C), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
    s_n, s_c, s_h, s_w = x.stride()
    return x.as_strided((n, H_out, W_out, C, kh, kw), (s_n, s_h * sh, s_w * sw, s_c, s_h * dh, s_w * dw),
                        x.storage_offset())


def _unfold(module, x):
    """Input patches (n, T, C_in·k) of a Conv1d / Conv2d, in the weight's (C_in, k) order.

    Copied once from the strided view of ``_windows``, which on CPU is several times
    faster than ``F.unfold`` followed by a transpose.
    """
    windows = _windows(module, x)
    n, H_out, W_out = windows.shape[:3]
    return windows.reshape(n, H_out * W_out, -1)


def _conv_materialized_in_pieces(ctx: LayerContext, x, g):
    """Materialized weight term of an ungrouped conv with one live call, never holding all
    its patches: per kernel row (and, for very wide layers, input-channel range), the
    patches of that row are copied from a channels-last input (one contiguous run of
    kw·C_in values per window row: several times faster to gather than the patches of
    ``F.unfold``), and Jᵢₖ[:, piece] = Gᵢₖᵀ Aᵢ[:, piece] is built for ranges of output
    channels (``_materialized_pieces``). The Gram is the sum of the pieces' Grams. Each piece's patches and J stay
    within ``ctx.term_bytes`` for the planned block; the pieces depend on the planned
    block, not on n, so that the term streams of two blocks stay aligned.

    x (n, C_in, *spatial_in), g (n, c, C_out, T)."""
    windows = _windows(ctx.module, x, channels_last=True)
    n, H_out, W_out, kh, kw, C_in = windows.shape
    positions = H_out * W_out
    in_step = _even_step(C_in, ctx.term_bytes // ((ctx.block or n) * positions * kw * x.element_size()))
    for row in range(kh):
        for start in range(0, C_in, in_step):
            A = windows[:, :, :, row, :, start:start + in_step].reshape(n, positions, -1)
            yield from _materialized_pieces(ctx, A, g)


# On CPU, oneDNN's weight-gradient convolution (grouped over the examples) beats unfolding
# the patches and a batched matmul once a map has this many output positions (measured
# on 2 cores: 16x16 maps 1.7-2.3x faster, 8x8 maps 2-4x slower); it also needs no patches.
BACKWARD_WEIGHT_MIN_POSITIONS = 256


def _conv_weight_by_backward(ctx: LayerContext, x, g):
    """Per-example weight gradients of an ungrouped conv from weight-gradient convolutions
    grouped over the examples: with the batch folded into channels, group i pairs
    example i's input with its output cotangents (all c outputs as extra output
    channels), so the weight gradient is (examples·c·C_out, C_in, *kernel) = Jᵢₖ.

    Output channels are taken in pieces whose J stays within ``ctx.term_bytes`` for the
    planned block; within a piece, examples are taken in runs whose unfolded inputs
    (what oneDNN's weight-gradient convolution lays out internally) would stay within
    half that bound. x (n, C_in, *spatial_in), g (n, c, C_out, *spatial_out)."""
    module = ctx.module
    pre_pad, padding = _conv_geometry(module)
    if pre_pad is not None:
        x = F.pad(x, pre_pad[0], mode=pre_pad[1])
    dims = x.dim() - 2
    if isinstance(padding, int):
        padding = (padding,) * dims
    n, C_in = x.shape[:2]
    c, d_out, out_spatial = g.shape[1], g.shape[2], g.shape[3:]
    kernel = tuple(module.kernel_size)
    fan_in = C_in * math.prod(kernel)
    itemsize = x.element_size()
    limit = ctx.term_bytes
    step = d_out if limit is None else _even_step(d_out, limit // ((ctx.block or n) * c * fan_in * itemsize))
    # half the term's bound for the convolution's internal unfolded inputs: runs of 16+
    # examples already run at the speed of one whole-block call (measured on 2 cores)
    run = n if limit is None else _even_step(n, limit // (2 * math.prod(out_spatial) * fan_in * itemsize))
    for start in range(0, d_out, step):
        piece = g[:, :, start:start + step]
        J = x.new_empty((n, c, piece.shape[2] * fan_in))
        for first in range(0, n, run):
            rows = slice(first, min(first + run, n))
            m = rows.stop - rows.start
            channels = m * c * piece.shape[2]
            weight_shape = x.new_empty(1).expand(channels, C_in, *kernel)  # only its shape is read
            J[rows] = torch.ops.aten.convolution_backward(
                piece[rows].reshape(1, channels, *out_spatial), x[rows].reshape(1, m * C_in, *x.shape[2:]),
                weight_shape, None, list(module.stride), list(padding), list(module.dilation), False,
                [0] * dims, m, (False, True, False))[1].reshape(m, c, -1)
        yield PerExampleGrads(J)


def _conv_weight_terms(ctx: LayerContext, x, g):
    """Materialized weight term of an ungrouped conv with one live call, g (n, c, C_out, *spatial).

    On CPU, for large maps, weight-gradient convolutions (``_conv_weight_by_backward``);
    otherwise patches gathered piece by piece and batched matmuls
    (``_conv_materialized_in_pieces``). The choice depends only on the layer and the
    device (never on the block's n), so that the term streams of two blocks stay aligned.
    """
    positions = math.prod(g.shape[3:])
    if x.device.type == "cpu" and positions >= BACKWARD_WEIGHT_MIN_POSITIONS:
        return _conv_weight_by_backward(ctx, x, g)
    return _conv_materialized_in_pieces(ctx, x, g.reshape(*g.shape[:3], positions))


def _conv_patches(ctx: LayerContext):
    patches = []
    for call in _live_calls(ctx):
        x, g = call.inputs[0], call.cotangents[0]
        n, c, c_out = g.shape[0], g.shape[1], g.shape[2]
        if "patches" not in call.cache:
            call.cache["patches"] = _unfold(ctx.module, x)
        patches.append((call.cache["patches"], g.reshape(n, c, c_out, -1)))
    return patches


def conv_rule(ctx: LayerContext):
    """nn.Conv1d / nn.Conv2d, any stride, padding (mode), dilation and groups."""
    live = _live_calls(ctx)
    if (ctx.form != FACTORED and ctx.module.groups == 1 and len(live) == 1 and ctx.term_bytes is not None
            and "weight" in ctx.params):
        g = live[0].cotangents[0]
        bias = [PerExampleGrads(g.reshape(*g.shape[:3], -1).sum(dim=3))] if "bias" in ctx.params else []
        return itertools.chain(bias, _conv_weight_terms(ctx, live[0].inputs[0], g))
    patches = _conv_patches(ctx)
    bias = _bias_term(patches) if "bias" in ctx.params else []
    weight = _weight_terms(ctx, patches, groups=ctx.module.groups) if "weight" in ctx.params else []
    return itertools.chain(bias, weight)  # lazily: the weight's pieces one at a time


def _conv_shapes(module, calls):
    positions = 0
    for call in calls:
        if call.outputs:
            out = call.outputs[0]
            positions += out[:1].numel() // module.out_channels
    k = math.prod(module.kernel_size)
    g = module.groups
    return [PatchShape(max(positions, 1), module.in_channels // g * k, module.out_channels // g, g)]


conv_rule.patch_shapes = _conv_shapes


# ----------------------------------------------------------------------------------------
# Normalization layers: per-example gradients from the normalized input x̂ (small).

def _affine_terms(ctx: LayerContext, normalized, flatten):
    """γ-gradient Σ_s g·x̂ and β-gradient Σ_s g of an affine normalization layer.

    ``normalized(x)`` recomputes x̂ from the recorded input; ``flatten(g, x̂)`` returns
    g as (n, c, P, S) and x̂ as (n, P, S), P the parameter size and S the dims it is
    shared over.
    """
    weight_grads, bias_grads = [], []
    for call in _live_calls(ctx):
        x, g = call.inputs[0], call.cotangents[0]
        flat_g, flat_xhat = flatten(g, normalized(x))
        if "weight" in ctx.params:
            weight_grads.append(torch.einsum("nkps,nps->nkp", flat_g, flat_xhat))
        if "bias" in ctx.params:
            bias_grads.append(flat_g.sum(dim=-1))
    terms = []
    for grads in (weight_grads, bias_grads):
        total = _sum_or_none(grads)
        if total is not None:
            terms.append(PerExampleGrads(total))
    return terms


def _channel_first(g, xhat):
    """Parameter along dim 1 (BatchNorm, GroupNorm)."""
    n, c, C = g.shape[0], g.shape[1], g.shape[2]
    return g.reshape(n, c, C, -1), xhat.reshape(n, C, -1)


def batchnorm_rule(ctx: LayerContext):
    """BatchNorm in eval mode: x̂ = (x − running_mean)/√(running_var + ε)."""
    m = ctx.module

    def normalized(x):
        return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)

    return _affine_terms(ctx, normalized, _channel_first)


def groupnorm_rule(ctx: LayerContext):
    """GroupNorm: x̂ from F.group_norm without affine; γ, β are per channel."""
    m = ctx.module
    return _affine_terms(ctx, lambda x: F.group_norm(x, m.num_groups, None, None, m.eps), _channel_first)


def layernorm_rule(ctx: LayerContext):
    """LayerNorm: x̂ from F.layer_norm without affine; γ, β have the normalized shape."""
    m = ctx.module
    size = math.prod(m.normalized_shape)

    def channel_last(g, xhat):
        n, c = g.shape[0], g.shape[1]
        return g.reshape(n, c, -1, size).transpose(2, 3), xhat.reshape(n, -1, size).transpose(1, 2)

    return _affine_terms(ctx, lambda x: F.layer_norm(x, m.normalized_shape, None, None, m.eps), channel_last)


# ----------------------------------------------------------------------------------------
# Generic rule: per-example torch.func over the module alone (reference-quality fallback).

def _batched_leaves(leaves, probe_call: Call | None, n: int, shared=None) -> list:
    """Which argument leaves carry the examples first: a leading dimension of n here and,
    when the probe's call (one example) is known, of 1 there, so that an argument that is
    not per example (a (T, d) table, an attention mask) is not split even when T = n.
    ``shared(t)``: whether t is known to be shared by all examples (an op group's shared
    tensor, whose leading size may be 1 = n in a block of one example)."""
    # a parameter passed as an argument is never per example, whatever its leading size
    batched = [isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.dim() > 0 and t.shape[0] == n
               and not (shared is not None and shared(t)) for t in leaves]
    if probe_call is None:
        return batched
    probe_leaves, _ = tree_flatten((probe_call.raw_args, probe_call.raw_kwargs))
    if len(probe_leaves) != len(leaves):
        return batched
    return [b and isinstance(q, torch.Tensor) and q.dim() > 0 and q.shape[0] == 1
            for b, q in zip(batched, probe_leaves)]


def _signature(call: Call):
    leaves, spec = tree_flatten((call.raw_args, call.raw_kwargs))
    return spec, [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in leaves]


def probe_templates(ctx: LayerContext) -> list:
    """For each recorded call, the probe's call (one example) that shows which of its
    arguments are per example: the probe's call of the same index; when the block made a
    different number of calls (a loop whose length depends on the data), the probe's first
    call if all the probe's calls look alike; otherwise None (leading size n alone decides)."""
    probe = ctx.probe_calls or []
    if len(probe) == len(ctx.calls):
        return list(probe)
    if probe and all(_signature(call) == _signature(probe[0]) for call in probe[1:]):
        return [probe[0]] * len(ctx.calls)
    return [None] * len(ctx.calls)


def cotangents_or_zeros(call: Call, params: dict, n: int, c: int) -> list:
    """The call's cotangents (n, c, ...), zeros (expanded, no memory) for outputs that do not
    reach the model output; on the parameters' device (outputs may be shape-only meta tensors)."""
    device = next(iter(params.values())).device
    return [g if g is not None else torch.zeros((), dtype=o.dtype, device=device).expand(n, c, *o.shape[1:])
            for g, o in zip(call.cotangents, call.outputs)]


def _per_example_vjp(module: nn.Module, params: dict, call: Call, n: int, c: int, probe_call: Call | None = None,
                     shared=None):
    """{name: (n, c, *shape)} gradients of ``params`` for every example and output."""
    leaves, spec = tree_flatten((call.raw_args, call.raw_kwargs))
    is_batched = _batched_leaves(leaves, probe_call, n, shared)
    batched = [t.detach() for t, b in zip(leaves, is_batched) if b]
    positions = call.output_positions
    cots = cotangents_or_zeros(call, params, n, c)

    def one_example(p, example_leaves, example_cots):
        it = iter(example_leaves)
        rebuilt = [next(it).unsqueeze(0) if b else leaf for leaf, b in zip(leaves, is_batched)]
        args, kwargs = tree_unflatten(rebuilt, spec)

        def forward(p):
            out_leaves, _ = tree_flatten(call_with(module, p, args, kwargs))
            return tuple(out_leaves[i] for i in positions)

        _, pullback = vjp(forward, p)
        # the outputs in a loop, not an inner vmap: nested vmaps of equal sizes (n = c) meet
        # wrong batching rules in torch 2.x (PReLU's backward mixes the two levels)
        per_output = [pullback(tuple(g[k].unsqueeze(0) for g in example_cots))[0] for k in range(c)]
        return {name: torch.stack([grads[name] for grads in per_output]) for name in p}

    return vmap(one_example, in_dims=(None, 0, 0))(params, batched, cots)


def _per_example_loop(module: nn.Module, params: dict, call: Call, n: int, c: int, probe_call: Call | None = None,
                      shared=None):
    """The gradients of ``_per_example_vjp`` from plain autograd, one example and output at a
    time: the fallback for modules whose vmap rules fail or are wrong (recurrent layers,
    PReLU under nested vmap in torch 2.x)."""
    leaves, spec = tree_flatten((call.raw_args, call.raw_kwargs))
    is_batched = _batched_leaves(leaves, probe_call, n, shared)
    grads = {name: p.new_zeros((n, c, *p.shape)) for name, p in params.items()}
    leaf_params = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    for i in range(n):
        rebuilt = [leaf[i:i + 1].detach() if b else leaf for leaf, b in zip(leaves, is_batched)]
        args, kwargs = tree_unflatten(rebuilt, spec)
        with torch.enable_grad():
            out_leaves, _ = tree_flatten(call_with(module, leaf_params, args, kwargs))
            outs = [out_leaves[j] for j in call.output_positions]
            for k in range(c):
                pairs = [(o, g[i:i + 1, k]) for o, g in zip(outs, call.cotangents) if g is not None]
                per_param = torch.autograd.grad([o for o, _ in pairs], list(leaf_params.values()),
                                                grad_outputs=[g.reshape(o.shape) for o, g in pairs],
                                                retain_graph=k + 1 < c, allow_unused=True)
                for name, g in zip(leaf_params, per_param):
                    if g is not None:  # sparse for nn.Embedding(sparse=True)
                        grads[name][i, k] = g.to_dense() if g.layout != torch.strided else g
    return grads


def _has_shapes(grads: dict, params: dict, n: int, c: int) -> bool:
    return all(tuple(grads[name].shape) == (n, c, *p.shape) for name, p in params.items())


def per_example_grads(module: nn.Module, params: dict, call: Call, n: int, c: int, probe_call: Call | None,
                      shared=None):
    """``_per_example_vjp``, or ``_per_example_loop`` where vmap fails or returns wrong shapes;
    ``shared``: see ``_batched_leaves``."""
    try:
        grads = _per_example_vjp(module, params, call, n, c, probe_call, shared)
    except (RuntimeError, ValueError):  # also ops without a batching rule
        grads = None  # no working vmap rule for some op of the module
    if grads is None or not _has_shapes(grads, params, n, c):
        grads = _per_example_loop(module, params, call, n, c, probe_call, shared)
    return grads


def generic_rule(ctx: LayerContext):
    """Any module: per-example vjp of ``functional_call`` of this module alone."""
    params = {name: p.detach() for name, p in ctx.params.items()}
    totals = []
    for call, probe_call in zip(ctx.calls, probe_templates(ctx)):
        if not _is_live(call):
            continue
        grads = per_example_grads(ctx.module, params, call, ctx.n, ctx.c, probe_call)
        totals.append(torch.cat([grads[name].reshape(ctx.n, ctx.c, -1) for name in params], dim=2))
    total = _sum_or_none(totals)
    return [] if total is None else [PerExampleGrads(total)]


def _is_live(call: Call) -> bool:
    """Whether at least one output of the call reaches the model output (multi-output modules)."""
    return bool(call.cotangents) and any(g is not None for g in call.cotangents)


# the parameters the structured rules know; a module of these types holding any other
# (e.g. weight_g / weight_v of the old nn.utils.weight_norm) takes the generic rule
for _rule in (linear_rule, conv_rule, batchnorm_rule, groupnorm_rule, layernorm_rule):
    _rule.parameter_names = frozenset({"weight", "bias"})

register_rule(nn.Linear, linear_rule)
register_rule(nn.Conv1d, conv_rule)
register_rule(nn.Conv2d, conv_rule)
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_bn, batchnorm_rule)
register_rule(nn.LayerNorm, layernorm_rule)
register_rule(nn.GroupNorm, groupnorm_rule)
