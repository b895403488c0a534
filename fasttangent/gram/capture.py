"""Forward hooks that record every call of the parameter-owning modules.

For each call we keep the positional and keyword inputs (by reference) and the tensor
outputs. The engine later differentiates the model output with respect to those
recorded outputs, which yields each layer's output cotangents for every example and
every model output at once.

Why outputs may be replaced by clones: models such as torchvision's ResNet apply in-place
ops (``ReLU(inplace=True)``, ``out += identity``) to a layer's output. An in-place op
rebases the tensor's autograd history, so a gradient taken "with respect to" it would
silently become the gradient with respect to the modified value. Handing the rest of
the network a clone keeps the recorded tensor untouched (the clone's backward is the
identity, so the cotangent is unchanged). A clone doubles the memory of every recorded
output, so the engine records without clones first and repeats the forward pass with
``clone_outputs=True`` only when ``Recorder.outputs_modified()`` reports an in-place op.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten


@dataclasses.dataclass
class Call:
    """One call of a module: its inputs and its differentiable tensor outputs.

    ``outputs`` lists the tensor leaves of the module's return value that carry autograd
    history; ``cotangents`` is filled by the engine with one (n, c, *output.shape[1:])
    tensor per output (``None`` where the model output does not depend on it).
    ``output_positions`` are the indices of ``outputs`` among the flattened leaves of the
    module's return value (what a rule re-running the module must pick out). ``cache`` lets
    a rule keep what it derives from the inputs (e.g. unfolded patches) across the output
    chunks of one block. ``release_outputs`` swaps the outputs for their autograd edges
    (``edges``, what the backward passes need) and shape-only meta tensors.
    """

    args: tuple
    kwargs: dict
    outputs: list
    output_positions: list
    input_versions: list
    output_versions: list = dataclasses.field(default_factory=list)
    edges: list | None = None
    cotangents: list | None = None
    cache: dict = dataclasses.field(default_factory=dict)

    def release_outputs(self) -> None:
        """Keep only the outputs' gradient edges and meta copies: no later op may read the
        outputs' values, and the memory of outputs that autograd does not save is freed."""
        self.edges = [get_gradient_edge(t) for t in self.outputs]
        self.outputs = [torch.empty_like(t, device="meta") for t in self.outputs]

    @property
    def inputs(self) -> tuple:
        """The inputs in call order: the positional ones, or the keyword ones for a call
        made with keywords only (``linear(input=x)``). What most rules need."""
        return self.args if self.args else tuple(self.kwargs.values())

    def check_inputs_unmodified(self, module: nn.Module) -> None:
        """Raise if an input was modified in place after the call (its values are then lost)."""
        leaves, _ = tree_flatten((self.args, self.kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        for tensor, version in zip(tensors, self.input_versions):
            if tensor._version != version:
                raise RuntimeError(
                    f"the input of {type(module).__name__} was modified in place after the module used it, "
                    "so its recorded value is lost; make that later op out-of-place (e.g. x = x.relu() "
                    "instead of x.relu_(), or inplace=False)")


class Recorder:
    """Context manager recording calls of ``modules`` (a list) into ``self.calls[module]``.

    Recording can be switched off (``recorder.active = False``) while rules re-run a
    module on its own, so that nested modules do not record those calls.
    """

    def __init__(self, modules, *, clone_outputs: bool = True):
        self.modules = list(modules)
        self.clone_outputs = clone_outputs
        self.calls = {m: [] for m in self.modules}
        self.active = True
        self._handles = []

    def __enter__(self):
        for module in self.modules:
            self._handles.append(module.register_forward_hook(self._hook(module), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def outputs_modified(self) -> bool:
        """Whether a later in-place op changed a recorded output (only possible without clones)."""
        return any(t._version != v for calls in self.calls.values() for call in calls
                   for t, v in zip(call.outputs, call.output_versions))

    def _hook(self, module):
        def hook(mod, args, kwargs, output):
            if not self.active:
                return None
            out_leaves, out_spec = tree_flatten(output)
            positions = [i for i, t in enumerate(out_leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
            recorded = [out_leaves[i] for i in positions]
            in_leaves, _ = tree_flatten((args, kwargs))
            versions = [t._version for t in in_leaves if isinstance(t, torch.Tensor)]
            self.calls[module].append(Call(args=args, kwargs=kwargs, outputs=recorded, output_positions=positions,
                                           input_versions=versions, output_versions=[t._version for t in recorded]))
            if not self.clone_outputs:
                return None
            replaced = list(out_leaves)
            for i in positions:
                replaced[i] = out_leaves[i].clone()
            return tree_unflatten(replaced, out_spec)

        return hook
