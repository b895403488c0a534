"""Rule for ``nn.MultiheadAttention`` (batch first): its projections as dense layers.

The module computes, per example (query X_q (L, E), key X_k (S, E_k), value X_v (S, E_v)),

    Q = X_q W_qᵀ + b_q,   K = X_k W_kᵀ + b_k,   V = X_v W_vᵀ + b_v
    O = concat_h softmax(Q_h K_hᵀ / √d_h + M) V_h          (L, E)
    y = O W_oᵀ + b_o,

with M the merged attention and key-padding masks. Every weight is a dense layer over
positions, so its per-example gradient is Gᵢₖᵀ Aᵢ with A its input and G the cotangent of
its output, and the usual factored or materialized terms apply (``rules._weight_terms``):

- W_o, b_o: A = O, G = g_y, the recorded output's cotangent;
- W_q, W_k, W_v (rows of ``in_proj_weight``, or the separate ``q/k/v_proj_weight``) and
  b_q, b_k, b_v: A = X_q, X_k, X_v and G = the cotangents of Q, K, V, from one backward
  pass through the attention core (not the projections) per model output, seeded with
  g_O = g_y W_o (and the attention weights' cotangent when they are used).

For self-attention (one tensor as query, key and value) the three projections share A,
so ``in_proj_weight`` is one term with G = [g_Q, g_K, g_V].

Configurations the rule does not re-implement (``batch_first=False``, ``add_bias_kv``,
``add_zero_attn``, dropout in training mode) take the generic rule (``supports``).
"""
from __future__ import annotations

import inspect
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .cost import PatchShape
from .rules import PerExampleGrads, _is_live, _weight_terms, register_rule

_FORWARD = inspect.signature(nn.MultiheadAttention.forward)


def supports(module: nn.MultiheadAttention) -> bool:
    """Whether the rule re-implements this module's configuration exactly."""
    return (module.batch_first and module.bias_k is None and module.bias_v is None and not module.add_zero_attn
            and (module.dropout == 0.0 or not module.training))


def _arguments(module, call) -> dict:
    bound = _FORWARD.bind(module, *call.args, **call.kwargs)
    bound.apply_defaults()
    return bound.arguments


def _additive(mask, dtype):
    """A boolean mask (True: not allowed) as an additive float mask; a float mask as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _merged_mask(arguments: dict, n: int, heads: int, L: int, S: int, dtype):
    """The additive mask (broadcastable to (n, heads, L, S)) or None. As in torch: with
    ``is_causal=True``, no key padding mask and no weights asked for, the module ignores
    ``attn_mask`` and applies the causal mask (top-left aligned) instead."""
    attn_mask = arguments["attn_mask"]
    if arguments["is_causal"] and arguments["key_padding_mask"] is None and not arguments["need_weights"]:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=attn_mask.device).triu(1)
    attn = _additive(attn_mask, dtype)
    if attn is not None:
        attn = attn.view(n, heads, L, S) if attn.dim() == 3 else attn
    padding = _additive(arguments["key_padding_mask"], dtype)
    if padding is not None:
        padding = padding.view(n, 1, 1, S)
    if attn is None:
        return padding
    return attn if padding is None else attn + padding


def _core(module, Q, K, V, mask, average: bool):
    """Attention without the projections: (O (n, L, E), weights (n, [heads,] L, S))."""
    n, L, E = Q.shape
    S = K.shape[1]
    H = module.num_heads
    d = E // H
    q = Q.view(n, L, H, d).transpose(1, 2)
    k = K.view(n, S, H, d).transpose(1, 2)
    v = V.view(n, S, H, d).transpose(1, 2)
    scores = (q * d ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    O = (weights @ v).transpose(1, 2).reshape(n, L, E)
    return O, (weights.mean(dim=1) if average else weights)


def _projection_weights(module):
    """(W_q, W_k, W_v), (b_q, b_k, b_v) (biases may be None)."""
    if module._qkv_same_embed_dim:
        W = module.in_proj_weight.detach().chunk(3)
    else:
        W = tuple(getattr(module, f"{x}_proj_weight").detach() for x in "qkv")
    b = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.detach().chunk(3)
    return W, b


def _cotangents(module, arguments, g_y, g_w):
    """(X_q, X_k, X_v), O and g_Q, g_K, g_V (each (n, c, T, E)) for one call; g_y or g_w
    (the cotangents of the output and of the attention weights) may be None."""
    X = tuple(arguments[name].detach() for name in ("query", "key", "value"))
    W, b = _projection_weights(module)
    n, L = X[0].shape[:2]
    S = X[1].shape[1]
    c = (g_y if g_y is not None else g_w).shape[1]
    mask = _merged_mask(arguments, n, module.num_heads, L, S, X[0].dtype)
    average = bool(arguments["average_attn_weights"])
    with torch.enable_grad():
        P = [F.linear(x, w, bias).detach().requires_grad_(True) for x, w, bias in zip(X, W, b)]
        O, weights = _core(module, *P, mask, average)
        g_O = None if g_y is None else g_y @ module.out_proj.weight.detach()  # (n, c, L, E)
        per_output = []
        for k in range(c):
            outs, seeds = ([O], [g_O[:, k]]) if g_O is not None else ([], [])
            if g_w is not None:
                outs.append(weights)
                seeds.append(g_w[:, k])
            per_output.append(torch.autograd.grad(outs, P, grad_outputs=seeds, retain_graph=k + 1 < c,
                                                  allow_unused=True))
    grads = []
    for j, p in enumerate(P):
        rows = [torch.zeros_like(p) if g[j] is None else g[j] for g in per_output]
        grads.append(torch.stack(rows, dim=1))
    return X, O.detach(), grads


def _channels_first(g):
    """(n, c, T, d) -> (n, c, d, T), the cotangent layout of ``_weight_terms``."""
    return g.transpose(2, 3)


def attention_rule(ctx):
    """nn.MultiheadAttention with ``batch_first=True`` (see the module docstring)."""
    module, params = ctx.module, ctx.params
    out_weight, out_bias, in_weight, in_bias = [], [], [], []
    for call in ctx.calls:
        if not _is_live(call):
            continue  # the model output depends on neither output of this call
        arguments = _arguments(module, call)
        g_y = call.cotangents[0] if call.output_positions[0] == 0 else None
        g_w = call.cotangents[-1] if call.output_positions[-1] == 1 else None
        X, O, (g_Q, g_K, g_V) = _cotangents(module, arguments, g_y, g_w)
        if g_y is not None:  # else the output's weights get no gradient from this call
            out_weight.append((O, _channels_first(g_y)))
            out_bias.append(g_y.sum(dim=2))
        self_attention = X[0] is X[1] and X[1] is X[2]
        if self_attention:
            in_weight.append([(X[0], _channels_first(torch.cat([g_Q, g_K, g_V], dim=3)))])
        else:
            in_weight.append([(x, _channels_first(g)) for x, g in zip(X, (g_Q, g_K, g_V))])
        in_bias.append(torch.cat([g_Q.sum(dim=2), g_K.sum(dim=2), g_V.sum(dim=2)], dim=2))
    terms = []
    if "out_proj.bias" in params and out_bias:
        terms.append([PerExampleGrads(sum(out_bias))])
    if "in_proj_bias" in params and in_bias:
        terms.append([PerExampleGrads(sum(in_bias))])
    if "out_proj.weight" in params and out_weight:
        terms.append(_weight_terms(ctx, out_weight, groups=1))
    terms.extend(_in_projection_terms(ctx, in_weight))
    return itertools.chain(*terms)


def _in_projection_terms(ctx, in_weight):
    """Terms of W_q, W_k, W_v: one term of the stacked ``in_proj_weight`` when every call is
    self-attention; otherwise the three blocks of rows apart (disjoint coordinates, so the
    Gram is the sum of theirs), each over every call. Separate ``q/k/v_proj_weight`` give
    a term each, for those among the owned parameters (one may be frozen or owned elsewhere)."""
    module, params = ctx.module, ctx.params
    if not in_weight:
        return []
    if module._qkv_same_embed_dim:
        if "in_proj_weight" not in params:
            return []
        if all(len(pieces) == 1 for pieces in in_weight):
            return [_weight_terms(ctx, [pieces[0] for pieces in in_weight], groups=1)]
        wanted = [0, 1, 2]
    else:
        wanted = [j for j, name in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")) if name in params]
    blocks = []
    for j in wanted:
        patches = []
        for pieces in in_weight:
            if len(pieces) == 1:  # a self-attention call: its stacked cotangent's rows for block j
                x, g = pieces[0]
                patches.append((x, g.chunk(3, dim=2)[j]))
            else:
                patches.append(pieces[j])
        blocks.append(_weight_terms(ctx, patches, groups=1))
    return blocks


def _attention_shapes(module, calls):
    positions = sum(call.outputs[0][:1].numel() // module.embed_dim for call in calls if call.outputs)
    return [PatchShape(max(positions, 1), module.embed_dim, 3 * module.embed_dim, 1),
            PatchShape(max(positions, 1), module.embed_dim, module.embed_dim, 1)]


attention_rule.patch_shapes = _attention_shapes
attention_rule.needs_grad = True  # a backward pass through the attention core: built after each pass
attention_rule.supports = supports
attention_rule.parameter_names = frozenset({"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                                            "v_proj_weight", "out_proj.weight", "out_proj.bias"})
register_rule(nn.MultiheadAttention, attention_rule)
