"""``torch.func.functional_call`` that leaves models with shared submodules intact.

With ``tie_weights=True`` (torch's default), ``functional_call`` on a model that reaches one
submodule by two paths (``self.b = self.a``) swaps the same parameter slot twice and, on
restoring, leaves a plain tensor where the model's ``nn.Parameter`` was (pytorch/pytorch
#164759): the model silently stops training. Here every slot is swapped exactly once,
under one of its paths, with ``tie_weights=False``; parameters shared between two
different slots get the same value in both.
"""
from __future__ import annotations

import itertools

from torch import nn
from torch.func import functional_call


def _slots(module: nn.Module) -> list:
    """(dotted name, tensor) of every parameter and buffer slot, each slot once (a submodule
    reached by several paths is listed under its first path)."""
    seen, slots = set(), []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr, tensor in itertools.chain(sub._parameters.items(), sub._buffers.items()):
            if tensor is None or (id(sub), attr) in seen:
                continue
            seen.add((id(sub), attr))
            slots.append((f"{prefix}.{attr}" if prefix else attr, tensor))
    return slots


def call_with(module: nn.Module, values: dict, args: tuple, kwargs: dict | None = None):
    """``module(*args, **kwargs)`` with its parameters and buffers replaced by ``values``
    ({name as in ``named_parameters()`` / ``named_buffers()``: tensor}; entries left out keep
    the module's own), the module itself unchanged afterwards. A value given for one name of
    a shared tensor is used everywhere that tensor is."""
    by_tensor = {}
    names = itertools.chain(module.named_parameters(remove_duplicate=False),
                            module.named_buffers(remove_duplicate=False))
    for name, tensor in names:
        if name in values:
            by_tensor.setdefault(id(tensor), values[name])
    replaced = {name: by_tensor[id(tensor)] for name, tensor in _slots(module) if id(tensor) in by_tensor}
    return functional_call(module, replaced, args, kwargs or {}, tie_weights=False)

