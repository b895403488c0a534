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

    ``args``/``kwargs`` are what ``forward`` received; ``raw_args``/``raw_kwargs`` are the
    arguments of the call before the module's forward pre-hooks, what a rule re-running the
    whole call (hooks included) must pass. ``hooks_changed``: a hook replaced the arguments
    or the output, so ``forward`` alone does not describe the call. ``output_shapes``: the
    shapes of every tensor leaf of the return value (recorded or not).
    """

    args: tuple
    kwargs: dict
    outputs: list
    output_positions: list
    input_versions: list
    output_versions: list = dataclasses.field(default_factory=list)
    raw_args: tuple = ()
    raw_kwargs: dict = dataclasses.field(default_factory=dict)
    hooks_changed: bool = False
    output_shapes: list = dataclasses.field(default_factory=list)
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

    def inputs_modified(self) -> bool:
        """Whether an input was modified in place after the call (its values are then lost)."""
        tensors = _input_tensors(self.args, self.kwargs, self.raw_args, self.raw_kwargs)
        return any(tensor._version != version for tensor, version in zip(tensors, self.input_versions))

    def check_inputs_unmodified(self, module: nn.Module) -> None:
        """Raise if an input was modified in place after the call (its values are then lost)."""
        if self.inputs_modified():
            raise RuntimeError(
                f"the input of {type(module).__name__} was modified in place after the module used it, "
                "so its recorded value is lost; make that later op out-of-place (e.g. x = x.relu() "
                "instead of x.relu_(), or inplace=False)")


def _input_tensors(*trees) -> list:
    leaves, _ = tree_flatten(trees)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _same_objects(a, b) -> bool:
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    return spec_a == spec_b and all(x is y for x, y in zip(leaves_a, leaves_b))


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
        self._raw = {m: [] for m in self.modules}  # per module, a stack (recursive calls)

    def __enter__(self):
        for module in self.modules:
            # first among the module's hooks: the arguments before, and the output before
            # any other hook may replace them
            self._handles.append(module.register_forward_pre_hook(self._raw_inputs(module), prepend=True,
                                                                  with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._raw_output(module), prepend=True))
            self._handles.append(module.register_forward_hook(self._hook(module), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def outputs_modified(self) -> bool:
        """Whether a later in-place op changed a recorded output, or the model registered a
        gradient hook on one (only possible without clones): the cotangent of the recorded
        tensor must be the one that reaches the layer, after the model's hooks, which holds
        when the rest of the network uses a clone."""
        hooked = not self.clone_outputs  # with clones, a hook left on a recorded output came from a forward
        # hook of the module itself (Grad-CAM style), which runs before the recorder's: the call
        # is marked ``hooks_changed`` instead (the generic rule re-runs the module, hooks included)
        return any(t._version != v or (hooked and t._backward_hooks) for calls in self.calls.values()
                   for call in calls for t, v in zip(call.outputs, call.output_versions))

    def _raw_inputs(self, module):
        def pre_hook(mod, args, kwargs):
            self._raw[module].append([args, kwargs, None])
        return pre_hook

    def _raw_output(self, module):
        def hook(mod, args, output):
            if self._raw[module]:
                versions = [t._version for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
                self._raw[module][-1][2] = (output, versions)
        return hook

    def _hook(self, module):
        def hook(mod, args, kwargs, output):
            raw_args, raw_kwargs, raw = self._raw[module].pop() if self._raw[module] else (args, kwargs, None)
            raw_output, raw_versions = raw if raw is not None else (output, None)
            if not self.active:
                return None
            out_leaves, out_spec = tree_flatten(output)
            positions = [i for i, t in enumerate(out_leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
            out_leaves = list(out_leaves)
            if len(positions) > 1:
                # Outputs may depend on each other (h and h @ v): the cotangent of the original
                # h would also carry the path through the other output, which the rule counts
                # once more. Recorded: clones that only the rest of the network uses.
                for i in positions:
                    out_leaves[i] = out_leaves[i].clone()
            recorded = [out_leaves[i] for i in positions]
            clone = self.clone_outputs or len(positions) > 1
            if self.clone_outputs:  # the network gets its own copies (see the module docstring)
                for i in positions:
                    out_leaves[i] = out_leaves[i].clone()
            versions = [t._version for t in _input_tensors(args, kwargs, raw_args, raw_kwargs)]
            # a hook that replaced the arguments or the output, or changed the output in place
            changed = output is not raw_output or not _same_objects((args, kwargs), (raw_args, raw_kwargs))
            # a forward hook that put a gradient hook on the output: a gradient taken with respect
            # to the output comes before that hook (torch), so the rules would miss what it does
            changed = changed or any(isinstance(t, torch.Tensor) and t._backward_hooks for t in tree_flatten(output)[0])
            if raw_versions is not None:
                changed = changed or raw_versions != [t._version for t in tree_flatten(output)[0]
                                                      if isinstance(t, torch.Tensor)]
            self.calls[module].append(Call(
                args=args, kwargs=kwargs, outputs=recorded, output_positions=positions, input_versions=versions,
                output_versions=[t._version for t in recorded], raw_args=raw_args, raw_kwargs=raw_kwargs,
                hooks_changed=changed,
                output_shapes=[tuple(t.shape) for t in out_leaves if isinstance(t, torch.Tensor)]))
            return tree_unflatten(out_leaves, out_spec) if clone else None

        return hook
