"""Networks of the image experiments (fasttangent.models)."""
import pytest
import torch
from torch import nn

from fasttangent import models
from fasttangent.alpha import AlphaScaled
from fasttangent.metrics import LinearityProbe


def _conv_params(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def _resnet18_param_count(stem_kernel, num_classes, bias):
    """Closed-form parameter count of a ResNet18 (BasicBlock [2, 2, 2, 2]) without norm layers."""
    total = _conv_params(3, 64, stem_kernel, bias)
    cin = 64
    for planes in (64, 128, 256, 512):
        for block in range(2):
            total += _conv_params(cin, planes, 3, bias) + _conv_params(planes, planes, 3, bias)
            if cin != planes:
                total += _conv_params(cin, planes, 1, bias)      # 1x1 downsample shortcut
            cin = planes
    return total + 512 * num_classes + num_classes


def test_cifar_resnet18_topology_matches_the_authors_cifar_variant():
    torch.manual_seed(0)
    model = models.cifar_resnet18(10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == _resnet18_param_count(3, 10, bias=True)
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(layer4=o.shape))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert seen["layer4"] == (2, 512, 4, 4)          # 3x3 stride-1 stem, no max-pool: 32 -> 4 after 3 downsamplings
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)


def test_cifar_resnet18_imagenet_stem_and_bias_free_option():
    model = models.cifar_resnet18(10, stem="imagenet", conv_bias=False, init="torchvision")
    assert sum(p.numel() for p in model.parameters()) == _resnet18_param_count(7, 10, bias=False)
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(layer4=o.shape))
    model(torch.randn(1, 3, 32, 32))
    assert seen["layer4"] == (1, 512, 1, 1)          # stride-2 stem + max-pool: 32 -> 1
    with pytest.raises(ValueError, match="stem"):
        models.cifar_resnet18(stem="7x7")


def test_cifar_resnet18_uses_pytorch_default_init():
    torch.manual_seed(0)
    model = models.cifar_resnet18(10)
    conv = model.layer2[0].conv1                       # 64 -> 128, 3x3: default bound 1/sqrt(fan_in)
    bound = 1 / (64 * 9) ** 0.5
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert conv.bias.abs().max() <= bound


def test_resnet18_no_norm_is_alpha_scalable_and_probe_ready():
    torch.manual_seed(0)
    model = models.resnet18_no_norm(1)
    x = torch.randn(3, 3, 64, 64)
    net = AlphaScaled(model, 100.0)                   # refuses BatchNorm in training mode: there is none
    assert torch.allclose(net(x), model(x))           # f^α = f_θ0 at θ = θ0
    probe = LinearityProbe(model, x[:2], metrics=["sign_similarity", "repr_alignment"])
    values = probe.measure(model)
    assert values == pytest.approx({"sign_similarity": 1.0, "repr_alignment": 1.0})


def _fake_imagenet_weights(path):
    from torchvision.models import resnet18
    torch.manual_seed(1)
    reference = resnet18(weights=None)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    torch.save(reference.state_dict(), path)
    return reference


def test_pretrained_resnet18_loads_file_fresh_head_frozen_batchnorm(tmp_path):
    path = tmp_path / "resnet18.pth"
    reference = _fake_imagenet_weights(path)
    model = models.pretrained_resnet18(path, 1)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer3[1].bn2.running_var, reference.layer3[1].bn2.running_var)
    assert model.fc.weight.shape == (1, 512)
    model.train()
    bn = model.layer1[0].bn1
    assert not bn.training and bn.weight.requires_grad
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)       # running statistics frozen
    AlphaScaled(model, 2.0)(torch.randn(1, 3, 64, 64))   # accepted: BatchNorm is in eval mode


def test_pretrained_resnet18_needs_an_existing_torchvision_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        models.pretrained_resnet18(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision resnet18"):
        models.pretrained_resnet18(tmp_path / "other.pth")


def test_small_cnn_shapes_and_relu_modules():
    model = models.small_cnn(1, 10)
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 4
    assert model.head.in_features == 64


def test_pretrain_small_cnn_learns_and_transfers_features(tmp_path):
    # two classes told apart by the sign of the mean pixel: any working training fits them
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (400,), generator=gen)
    x = torch.randn(400, 1, 12, 12, generator=gen) * 0.5 + (2 * y - 1).float().view(-1, 1, 1, 1)
    result = models.pretrain_small_cnn(x, y, tmp_path / "w.pt", epochs=10, lr=0.05, width=8, hidden=16, seed=0)
    assert result["train_accuracy"] > 0.95
    saved = torch.load(tmp_path / "w.pt", weights_only=True)["state_dict"]
    torch.manual_seed(5)
    model = models.load_pretrained_small_cnn(tmp_path / "w.pt", num_outputs=1)
    assert model.head.out_features == 1
    for name, value in model.features.state_dict().items():
        assert torch.equal(value, saved[f"features.{name}"])
    with pytest.raises(FileNotFoundError, match="pretrain_small_cnn"):
        models.load_pretrained_small_cnn(tmp_path / "none.pt", 1)
