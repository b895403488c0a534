"""ft.ntk_gram on torchvision architectures whose parameters are not all in layers with a
structured rule (attention, class tokens, position embeddings, layer scales), against a
float64 plain-autograd reference; and the owners they get, which decide the speed: no
module may fall back to the generic rule over the whole network."""
from __future__ import annotations

import pytest
import torch

import fasttangent as ft
from fasttangent.gram.engine import GramEngine
from references import lean_loop_reference

torchvision = pytest.importorskip("torchvision")


def _vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=4)


ARCHITECTURES = {
    # name: (factory, input size, owners allowed on the generic rule)
    "vit": (_vit, 32, 0),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=4), 32, 0),
    "swin_t": (lambda: torchvision.models.swin_t(num_classes=4), 32, None),
}


def _generic_owners(model, x) -> int:
    engine = GramEngine(model, full=False, selected=[0], backend="torch", memory_budget=1 << 30, conv_form="auto")
    engine.term_bytes = 1 << 24
    engine.probe(x)
    engine._record(x)
    return sum(engine.rule(m).__name__ == "generic_rule" for m in engine.owners)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_matches_reference(name):
    factory, size, most_generic = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    if most_generic is not None:
        assert _generic_owners(model, x) <= most_generic
    reference = lean_loop_reference(model, x)
    K = ft.ntk_gram(model, x)
    assert ((K - reference).norm() / reference.norm()).item() < 1e-10


def _benchmark_module():
    """bench/ntk_gram.py, whose nanoGPT-style model this checks at a tiny size."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "ntk_gram.py"
    spec = importlib.util.spec_from_file_location("ntk_gram_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_gpt_is_structured_and_exact():
    """The benchmark's nanoGPT-style model (positions as wpe(arange(T)), a tied head): no owner
    on the generic rule, and the Gram of a plain-autograd loop, for blocks of 1 and a cross Gram."""
    torch.manual_seed(0)
    model = _benchmark_module().CharGPT(vocab=11, block=8, layers=1, heads=2, width=8).double().eval()
    x1, x2 = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (3, 5))
    assert _generic_owners(model, x1) == 0
    reference = lean_loop_reference(model, x1)
    for kwargs in ({}, {"block_size": 1}):
        K = ft.ntk_gram(model, x1, **kwargs)
        assert ((K - reference).norm() / reference.norm()).item() < 1e-10, kwargs
    both = lean_loop_reference(model, torch.cat([x1, x2]))
    cross = ft.ntk_gram(model, x1, x2)
    assert ((cross - both[:4, 4:]).norm() / both[:4, 4:].norm()).item() < 1e-10
