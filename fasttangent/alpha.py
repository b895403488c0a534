"""α-scaling between feature learning (α ≤ 1) and lazy training (α → ∞).

f^α_θ(x) = f_θ0(x) + α (f_θ(x) − f_θ0(x)), trained with learning rate η/α²
(Chizat et al. 2019; George et al. 2022, §2). θ0 is a frozen snapshot of the initial
parameters and buffers; it is never trained and is not among ``.parameters()``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ._functional import call_with


def alpha_lr(lr: float, alpha: float) -> float:
    """The learning rate η/α² that keeps the function-space speed independent of α."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return lr / alpha**2


class _FrozenState(nn.Module):
    """Holds θ0 as buffers (so it is saved in ``state_dict`` and moved by ``.to``) under
    names with '.' replaced, since buffer names may not contain dots."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = []
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            key = name.replace(".", "__")
            if hasattr(self, key):
                raise ValueError(f"two entries of the model map to the frozen name {key!r}; rename the "
                                 f"module or parameter {name!r} so that it has no '__' in its name")
            self.register_buffer(key, t.detach().clone())
            self.names.append(name)

    def as_dict(self) -> dict:
        return {name: getattr(self, name.replace(".", "__")) for name in self.names}


class AlphaScaled(nn.Module):
    """Wrap ``model`` as f^α_θ(x) = f_θ0(x) + α (f_θ(x) − f_θ0(x)).

    Args:
        model: the network f_θ; its current parameters become θ0. It stays reachable as
            ``.model`` and its parameters are the only trainable ones.
        alpha: the scale α > 0 (1: standard training; large: lazy; 0.5: more feature learning).
        center: drop the f_θ0(x) term, i.e. f^α = α (f_θ − f_θ0), which is 0 at init (the
            authors' code did this); default is the paper's formula.

    ``forward(x, f0=None)``: x (n, ...) -> (n, c). Pass ``f0`` (n, c), e.g. from a cache of
    ``initial_output(x)``, to skip the second forward pass through θ0 (a step then costs
    one forward and one backward, as for the bare model).

    The gradient of f^α with respect to θ is α ∂f_θ/∂θ, so with the learning rate
    ``alpha_lr(η, α)`` = η/α² the first-order change of f^α per step does not depend on α.

    BatchNorm in training mode is refused (its batch statistics would make f_θ0 depend on
    the batch and its running statistics would drift): call ``remove_batchnorm`` or
    ``freeze_batchnorm`` on the model first.
    """

    def __init__(self, model: nn.Module, alpha: float, center: bool = False):
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.model = model
        self.alpha = float(alpha)
        self.center = bool(center)
        self.theta0 = _FrozenState(model)
        self._parameter_names = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def initial_output(self, x: torch.Tensor) -> torch.Tensor:
        """f_θ0(x), computed without gradient. x (n, ...) -> (n, c)."""
        _check_no_training_batchnorm(self.model)
        # No copy of θ0 is needed: the only standard module that writes its buffers in
        # forward is BatchNorm in training mode, refused above.
        return call_with(self.model, self.theta0.as_dict(), (x,))

    def initial_model(self) -> nn.Module:
        """A new copy of ``.model`` holding θ0 (parameters and buffers), e.g. the reference
        of a linearity probe after resuming from a checkpoint."""
        reference = copy.deepcopy(self.model)  # keeps tied parameters tied
        with torch.no_grad():
            # by name, not load_state_dict: θ0 lists a tied parameter once (as
            # named_parameters does) and includes non-persistent buffers
            for name, value in self.theta0.as_dict().items():
                target = (reference.get_parameter(name) if name in self._parameter_names
                          else reference.get_buffer(name))
                target.copy_(value)
        return reference

    def forward(self, x: torch.Tensor, f0: torch.Tensor | None = None) -> torch.Tensor:
        _check_no_training_batchnorm(self.model)
        f = self.model(x)
        if f0 is None:
            f0 = self.initial_output(x)
        scaled = self.alpha * (f - f0)
        return scaled if self.center else f0 + scaled

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, center={self.center}"


def _check_no_training_batchnorm(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise RuntimeError(
                f"BatchNorm module '{name}' is in training mode: its batch statistics make f_θ0 "
                "depend on the batch and change θ0's running statistics. Either remove BatchNorm "
                "(fasttangent.alpha.remove_batchnorm) or freeze it in eval mode "
                "(fasttangent.alpha.freeze_batchnorm)."
            )


class _FrozenBatchNormMixin:
    """Keeps a BatchNorm in eval mode whatever ``.train()`` is called with."""

    def train(self, mode: bool = True):
        return super().train(False)


def _frozen_class(cls: type) -> type:
    """``Frozen<cls>``: ``cls`` with ``.train()`` pinned to eval mode. Created once per class
    and published in this module, so that models holding it can still be pickled."""
    name = f"Frozen{cls.__name__}"
    frozen = globals().get(name)
    if frozen is None or not issubclass(frozen, cls):
        frozen = type(name, (_FrozenBatchNormMixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = frozen
    return frozen


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm in eval mode for good (running statistics frozen; affine
    parameters still trainable), as the paper did for Waterbirds. Returns ``model``,
    modified in place; ``state_dict`` keys are unchanged."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _FrozenBatchNormMixin):
            m.__class__ = _frozen_class(type(m))
            m.eval()
    return model


def remove_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm with ``nn.Identity`` (the paper's CIFAR/CelebA ResNet18
    had no normalization). Returns ``model``, modified in place (a bare BatchNorm passed
    as ``model`` itself cannot be replaced in place: it is returned as ``nn.Identity()``)."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return nn.Identity()
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            remove_batchnorm(child)
    return model
