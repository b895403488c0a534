"""Networks of the "Lazy vs hasty" image experiments, and the small CNN of the CPU stand-ins.

    cifar_resnet18(num_classes=10)              # Fig. 2: CIFAR-10 ResNet18, no normalization
    resnet18_no_norm(num_outputs=1)             # Fig. 3 top: CelebA, ResNet18 without BatchNorm
    pretrained_resnet18(weights_path, 1)        # Fig. 3 bottom: Waterbirds, ImageNet weights, BN frozen
    small_cnn(in_channels=1, num_outputs=10)    # CPU scale (Fashion-MNIST, digits)
    pretrain_small_cnn(x, y, path) / load_pretrained_small_cnn(path, num_outputs)

Every ReLU is a non-inplace ``nn.ReLU`` module, so that the sign-similarity metric (which
hooks ``nn.ReLU`` modules, counting every call) sees all of them and ``torch.func``
transforms of the NTK do not meet in-place writes.

CIFAR stem. The paper says "ResNet18" without details; the authors' code used the usual
CIFAR variant of ResNet18: a 3×3 stride-1 first convolution, no max-pool, biases in every
convolution when normalization is off, 4×4 average pooling before the linear layer, and
PyTorch's default initialization. ``cifar_resnet18`` builds exactly that topology out of
torchvision's ``resnet18`` (whose ``BasicBlock`` has the same structure) with the norm
layer replaced by ``nn.Identity``; ``stem="imagenet"`` keeps torchvision's 7×7 stride-2
convolution and max-pool instead. CelebA used torchvision's ``resnet18(norm_layer=Identity)``
unchanged (ImageNet stem, bias-free convolutions, torchvision's initialization) with a
1-output head, which ``resnet18_no_norm`` reproduces.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .alpha import freeze_batchnorm


# ----------------------------------------------------------------------------- helpers

def _relu_not_inplace(model: nn.Module) -> nn.Module:
    """Make every ``nn.ReLU`` non-inplace (torchvision builds them with ``inplace=True``)."""
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


def _with_conv_bias(model: nn.Module) -> nn.Module:
    """Replace every bias-free ``nn.Conv2d`` by the same convolution with a bias."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d) and child.bias is None:
            setattr(model, name, nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                           stride=child.stride, padding=child.padding, dilation=child.dilation,
                                           groups=child.groups, bias=True, padding_mode=child.padding_mode))
        else:
            _with_conv_bias(child)
    return model


def _default_init(model: nn.Module) -> nn.Module:
    """PyTorch's default initialization of every convolution and linear layer (what the
    authors' CIFAR ResNet18 used, instead of torchvision's Kaiming-normal fan-out)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    return model


def _torchvision_resnet18(**kwargs) -> nn.Module:
    from torchvision.models import resnet18
    return resnet18(weights=None, **kwargs)


# ----------------------------------------------------------------------------- ResNet18 variants

def cifar_resnet18(num_classes: int = 10, *, stem: str = "cifar", conv_bias: bool = True,
                   init: str = "pytorch") -> nn.Module:
    """The paper's CIFAR-10 ResNet18 without any normalization: (n, 3, 32, 32) -> (n, num_classes).

    Args:
        num_classes: outputs of the last linear layer.
        stem: "cifar" (3×3 stride-1 first convolution, no max-pool: the authors' code) or
            "imagenet" (torchvision's 7×7 stride-2 convolution and 3×3 max-pool).
        conv_bias: give every convolution a bias (the authors' code did, as normalization
            is off); False keeps torchvision's bias-free convolutions.
        init: "pytorch" (default ``reset_parameters``, the authors' code) or "torchvision"
            (torchvision's Kaiming-normal fan-out initialization of convolutions).
    """
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem = {stem!r}; choose 'cifar' (3x3 stride 1, no max-pool) or 'imagenet'")
    if init not in ("pytorch", "torchvision"):
        raise ValueError(f"init = {init!r}; choose 'pytorch' or 'torchvision'")
    model = _torchvision_resnet18(num_classes=num_classes, norm_layer=nn.Identity)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if conv_bias:
        _with_conv_bias(model)
    if init == "pytorch":
        _default_init(model)
    elif stem == "cifar":
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return _relu_not_inplace(model)


def resnet18_no_norm(num_outputs: int = 1) -> nn.Module:
    """torchvision's ResNet18 with ``norm_layer=nn.Identity`` and a ``num_outputs`` head, as
    the authors trained on CelebA from scratch: (n, 3, h, w) -> (n, num_outputs)."""
    return _relu_not_inplace(_torchvision_resnet18(num_classes=num_outputs, norm_layer=nn.Identity))


def pretrained_resnet18(weights_path: str | os.PathLike, num_outputs: int = 1, *,
                        freeze_norm: bool = True) -> nn.Module:
    """ImageNet-pretrained ResNet18 with a freshly initialized ``num_outputs`` head (Waterbirds).

    The weights are read from ``weights_path``: a torchvision ``resnet18`` state dict (e.g.
    ``resnet18-f37072fd.pth``), or a checkpoint holding one under "state_dict"/"model".
    Nothing is ever downloaded. The ImageNet ``fc`` entries are dropped; the new head gets
    PyTorch's default initialization from the current RNG. With ``freeze_norm`` every
    BatchNorm stays in eval mode for good (running statistics frozen at their pretrained
    values, affine parameters trainable), as in the paper.
    """
    path = os.fspath(weights_path) if weights_path else ""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained ResNet18 weights not found at {path!r}. fasttangent never downloads weights: "
            "download torchvision's resnet18 ImageNet state dict (resnet18-f37072fd.pth) yourself and pass "
            "its path (config task_args.pretrained_weights, or --set task_args.pretrained_weights=\"PATH\")")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    model = _torchvision_resnet18()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{path} is not a torchvision resnet18 state dict: missing {missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]}; pass the ImageNet resnet18 weights file")
    model.fc = nn.Linear(model.fc.in_features, num_outputs)
    if freeze_norm:
        freeze_batchnorm(model)
    return _relu_not_inplace(model)


# ----------------------------------------------------------------------------- CPU-scale CNN

class SmallCNN(nn.Module):
    """Three 3×3 convolutions (strides ``stem_stride``, 2, 2) with ReLU, global average pooling, a hidden
    linear layer with ReLU and a linear head: (n, in_channels, h, w) -> (n, num_outputs).

    The representation of the linearity metrics is the input of ``head`` (``hidden`` units).
    ``features`` (everything but ``head``) is what pretraining transfers.
    """

    def __init__(self, in_channels: int = 1, num_outputs: int = 10, width: int = 16, hidden: int = 64,
                 stem_stride: int = 2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, hidden), nn.ReLU(),
        )
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_cnn(in_channels: int = 1, num_outputs: int = 10, *, width: int = 16, hidden: int = 64,
              stem_stride: int = 2) -> SmallCNN:
    """A ``SmallCNN`` with PyTorch's default initialization (from the current RNG). The
    stride-2 stem makes a 28×28 step ~3× cheaper than stride 1 (a 2-core CPU budget)."""
    return SmallCNN(in_channels, num_outputs, width, hidden, stem_stride)


def pretrain_small_cnn(x: torch.Tensor, y: torch.Tensor, path: str | os.PathLike, *, num_classes: int | None = None,
                       width: int = 16, hidden: int = 64, stem_stride: int = 2, epochs: int = 3,
                       batch_size: int = 100, lr: float = 0.01, momentum: float = 0.9, seed: int = 0) -> dict:
    """Train a ``SmallCNN`` classifier on (x, y) and save its weights to ``path``.

    The CPU stand-in of an ImageNet-pretrained network: pretrain on a task disjoint from
    the downstream one (e.g. other Fashion-MNIST classes), then ``load_pretrained_small_cnn``.
    x (n, c, h, w) float, y (n,) int64 class indices. SGD with momentum and cross-entropy.
    Returns {"train_accuracy": float, "path": str}; the file holds {"state_dict",
    "in_channels", "width", "hidden", "stem_stride", "num_classes"}.
    """
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = small_cnn(x.shape[1], num_classes, width=width, hidden=hidden, stem_stride=stem_stride)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float(torch.cat([model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]
                                    for i in range(0, len(y), 1000)]).float().mean())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "in_channels": x.shape[1], "width": width, "hidden": hidden,
                "stem_stride": stem_stride, "num_classes": num_classes}, path)
    return {"train_accuracy": accuracy, "path": os.fspath(path)}


def load_pretrained_small_cnn(path: str | os.PathLike, num_outputs: int) -> SmallCNN:
    """A ``SmallCNN`` whose ``features`` come from a ``pretrain_small_cnn`` file and whose
    ``head`` (``num_outputs`` wide) is freshly initialized from the current RNG."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained small-CNN weights not found at {path!r}; create them with "
                                "fasttangent.models.pretrain_small_cnn (the waterbirds CPU run does so)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = small_cnn(saved["in_channels"], num_outputs, width=saved["width"], hidden=saved["hidden"],
                      stem_stride=saved["stem_stride"])
    features = {k.removeprefix("features."): v for k, v in saved["state_dict"].items() if k.startswith("features.")}
    model.features.load_state_dict(features)
    return model
