"""The public API on small real models: backend="triton" (interpreted kernels) agrees with
backend="torch" for NTK Grams (dense, factored conv and materialized conv layers) and for
the three linearity metrics."""
import importlib

import pytest
import torch
from torch import nn

import fasttangent as ft

ntk_module = pytest.importorskip("fasttangent.ntk")
metrics_module = pytest.importorskip("fasttangent.metrics")


_WRAPPERS = {"gram": ["gram_triton"], "factored_dense_gram": ["factored_dense_gram_triton"],
             "factored_conv_gram": ["factored_conv_gram_triton"],
             "sign_mask": ["pack_signs_triton", "count_sign_matches_triton"],
             "alignment": ["alignment_terms_triton", "representation_alignment_terms_triton"]}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of each Triton host wrapper, to prove the API really took the kernels."""
    calls = {}
    for module_name, names in _WRAPPERS.items():
        module = importlib.import_module(f"fasttangent.kernels.{module_name}")
        for name in names:
            def counted(*args, _inner=getattr(module, name), _name=name, **kwargs):
                calls[_name] = calls.get(_name, 0) + 1
                return _inner(*args, **kwargs)
            monkeypatch.setattr(module, name, counted)
    return calls


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))


def _cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16, 3))


def _close(actual, expected, rtol=2e-5):
    """Elementwise within rtol of the largest entry (float32 accumulation on both paths)."""
    assert actual.shape == expected.shape
    assert (actual.double() - expected.double()).abs().max() <= rtol * expected.double().abs().max()


@pytest.mark.parametrize("outputs", ["trace", "full", 1])
def test_ntk_gram_dense(outputs, kernel_calls):
    model = _mlp(0)
    x1, x2 = torch.randn(9, 2), torch.randn(5, 2)
    for second in (None, x2):
        _close(ft.ntk_gram(model, x1, second, outputs=outputs, backend="triton"),
               ft.ntk_gram(model, x1, second, outputs=outputs, backend="torch"))
    assert kernel_calls, "no Triton kernel ran"


@pytest.mark.parametrize("conv_form", ["factored", "materialized"])
def test_ntk_gram_conv(conv_form, kernel_calls):
    model = _cnn(0)
    x1, x2 = torch.randn(4, 2, 7, 7), torch.randn(3, 2, 7, 7)
    for second in (None, x2):
        _close(ft.ntk_gram(model, x1, second, conv_form=conv_form, backend="triton"),
               ft.ntk_gram(model, x1, second, conv_form=conv_form, backend="torch"))
    if conv_form == "factored":
        assert kernel_calls.get("factored_conv_gram_triton"), kernel_calls
    else:
        assert kernel_calls.get("gram_triton"), kernel_calls


def test_linearity_metrics(kernel_calls):
    model, reference = _cnn(1), _cnn(2)
    x = torch.randn(5, 2, 7, 7)
    assert ft.sign_similarity(model, reference, x, backend="triton").item() == \
        ft.sign_similarity(model, reference, x, backend="torch").item()
    for metric in (ft.ntk_alignment, ft.representation_alignment):
        triton_value = metric(model, reference, x, backend="triton").item()
        torch_value = metric(model, reference, x, backend="torch").item()
        assert abs(triton_value - torch_value) <= 1e-5, (metric.__name__, triton_value, torch_value)
    for wrapper in ("pack_signs_triton", "count_sign_matches_triton", "alignment_terms_triton",
                    "representation_alignment_terms_triton"):
        assert kernel_calls.get(wrapper), (wrapper, kernel_calls)
