"""Structured empirical-NTK Gram engine behind ``fasttangent.ntk_gram``.

- ``capture``: forward hooks recording every call of parameter-owning modules;
- ``rules``: the per-layer rule registry (Linear, Conv1d/2d, norms, generic torch.func);
- ``attention``: the nn.MultiheadAttention rule;
- ``ops``: parameters owned by the single ops that use them (class tokens, position
  embeddings, layer scales, tied decoders) instead of a module on the generic rule;
- ``cost``: the factored-vs-materialized cost model for positions layers;
- ``engine``: ownership, batched backward over outputs, blocks and symmetry.
"""
from .cost import PatchShape, choose_form
from .rules import FactoredTerm, LayerContext, PerExampleGrads, generic_rule, register_rule, rule_for

__all__ = ["FactoredTerm", "LayerContext", "PatchShape", "PerExampleGrads", "choose_form", "generic_rule",
           "register_rule", "rule_for"]
