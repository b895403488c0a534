"""AlphaScaled against torch.func references (float64)."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from fasttangent.alpha import AlphaScaled, alpha_lr, freeze_batchnorm, remove_batchnorm


def _mlp(c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, c)).double()


def _x(n=7, seed=1):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _jacobian(model, x):
    """J (n, c, p) of the model's output with respect to all parameters, by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    n, c = x.shape[0], next(iter(jac.values())).shape[1]
    return torch.cat([j.reshape(n, c, -1) for j in jac.values()], dim=2)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 100.0])
def test_equals_initial_network_at_init_and_centered_is_zero(alpha):
    model, x = _mlp(), _x()
    expected = model(x).detach()
    torch.testing.assert_close(AlphaScaled(model, alpha)(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(AlphaScaled(model, alpha, center=True)(x), torch.zeros_like(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("center", [False, True])
def test_gradient_is_alpha_times_jacobian(center):
    alpha, model, x = 37.0, _mlp(), _x()
    # move away from θ0 so that f_θ ≠ f_θ0 and the gradient is taken at a generic point
    wrapped = AlphaScaled(model, alpha, center=center)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    v = torch.randn(x.shape[0], 3, dtype=torch.float64)
    (wrapped(x) * v).sum().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = alpha * torch.einsum("nc,ncp->p", v, _jacobian(model, x))
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_forward_formula_away_from_init():
    alpha, model, x = 5.0, _mlp(), _x()
    f0 = model(x).detach()
    wrapped = AlphaScaled(model, alpha)
    with torch.no_grad():
        model[0].weight.mul_(1.3)
    f = model(x).detach()
    torch.testing.assert_close(wrapped(x), f0 + alpha * (f - f0))
    torch.testing.assert_close(AlphaScaled.forward(wrapped, x, f0=f0), wrapped(x))
    torch.testing.assert_close(wrapped.initial_output(x), f0)
    torch.testing.assert_close(wrapped.initial_model()(x), f0)


def test_theta0_frozen_and_not_trainable_over_training():
    model, x = _mlp(), _x()
    initial = copy.deepcopy(model.state_dict())
    wrapped = AlphaScaled(model, 10.0)
    assert wrapped.model is model
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in model.parameters()}
    assert all(not t.requires_grad for t in wrapped.theta0.buffers())
    assert any(k.startswith("theta0.") for k in wrapped.state_dict())
    opt = torch.optim.SGD(wrapped.parameters(), lr=alpha_lr(0.1, 10.0), momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        wrapped(x).square().sum().backward()
        opt.step()
    for name, t in wrapped.theta0.as_dict().items():
        assert torch.equal(t, initial[name]), name
    assert not torch.equal(model[0].weight, initial["0.weight"])


def test_large_alpha_step_follows_the_tangent_kernel():
    """One GD step on f^α with lr η/α² moves f^α by −η K ∇ℓ + O(1/α) (paper eq. 2)."""
    eta, model, x = 1e-2, _mlp(c=2), _x()
    target = torch.randn(x.shape[0], 2, dtype=torch.float64)
    jac = _jacobian(model, x).reshape(-1, sum(p.numel() for p in model.parameters()))
    kernel = jac @ jac.T                                        # (n·c, n·c)
    f0 = model(x).detach()
    expected_change = -eta * (kernel @ (f0 - target).reshape(-1)).reshape(f0.shape)
    changes = {}
    for alpha in (1.0, 1e4):
        m = copy.deepcopy(model)
        wrapped = AlphaScaled(m, alpha)
        opt = torch.optim.SGD(m.parameters(), lr=alpha_lr(eta, alpha))
        (0.5 * (wrapped(x) - target).square().sum()).backward()
        opt.step()
        changes[alpha] = wrapped(x).detach() - f0
    torch.testing.assert_close(changes[1e4], expected_change, rtol=1e-3, atol=1e-8)
    # at α = 1 the second-order terms are visible: the check above is not trivially true
    assert (changes[1.0] - expected_change).abs().max() > 10 * (changes[1e4] - expected_change).abs().max()


def test_alpha_lr_and_invalid_alpha():
    assert alpha_lr(0.01, 100.0) == pytest.approx(1e-6)
    assert alpha_lr(0.01, 0.5) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="alpha"):
        alpha_lr(0.1, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        AlphaScaled(_mlp(), -1.0)


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def test_batchnorm_in_training_mode_is_refused():
    wrapped = AlphaScaled(_bn_net(), 2.0)
    with pytest.raises(RuntimeError, match="freeze_batchnorm"):
        wrapped(torch.randn(5, 4))


def test_freeze_batchnorm_keeps_running_statistics_and_pickles():
    net = _bn_net()
    with torch.no_grad():
        net[1].running_mean.fill_(0.3)
    freeze_batchnorm(net)
    wrapped = AlphaScaled(net, 2.0)
    wrapped.train()
    assert not net[1].training and net[0].training
    before = copy.deepcopy(net[1].state_dict())
    x = torch.randn(6, 4)
    out = wrapped(x)
    out.sum().backward()
    assert net[1].weight.grad is not None                       # affine parameters still train
    for k, v in net[1].state_dict().items():
        assert torch.equal(v, before[k]), k
    # eval-mode BatchNorm is an affine map of the running statistics
    h = net[0](x)
    bn = net[1]
    expected = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(bn(h), expected)
    clone = pickle.loads(pickle.dumps(net))
    torch.testing.assert_close(clone(x), net(x))
    assert isinstance(clone[1], nn.BatchNorm1d)


def test_remove_batchnorm():
    net = remove_batchnorm(_bn_net())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = torch.randn(3, 4)
    torch.testing.assert_close(net(x), net[3](net[2](net[0](x))))
    AlphaScaled(net, 3.0)(x)                                    # accepted now
    assert isinstance(remove_batchnorm(nn.BatchNorm2d(3)), nn.Identity)


class _SharedSubmodule(nn.Module):
    """One Linear reached by two paths (``second = first``) and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = self.first
        self.out = nn.Linear(4, 2)
        self.register_buffer("shift", torch.full((4,), 0.1), persistent=False)

    def forward(self, x):
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x) + self.shift))))


def test_shared_submodule_and_nonpersistent_buffer_keep_the_model_intact():
    """f_θ0 through a submodule reached by two paths must not leave plain tensors where the
    model's parameters were (torch's functional_call does, pytorch/pytorch#164759), and
    ``initial_model`` must restore θ0 for tied parameters and non-persistent buffers."""
    torch.manual_seed(0)
    model, x = _SharedSubmodule().double(), _x()
    expected = model(x).detach()
    net = AlphaScaled(model, 5.0)
    with torch.no_grad():
        model.first.weight.add_(0.3)
        model.shift.add_(1.0)
    torch.testing.assert_close(net.initial_output(x), expected, rtol=0, atol=1e-12)
    assert isinstance(model.first.weight, nn.Parameter) and model.second.weight is model.first.weight
    assert set(net.parameters()) == set(model.parameters())
    reference = net.initial_model()
    torch.testing.assert_close(reference(x), expected, rtol=0, atol=1e-12)
    assert reference.second.weight is reference.first.weight
