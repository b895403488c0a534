"""fasttangent: structured empirical-NTK Grams and linearity metrics for any nn.Module.

    K = ntk_gram(model, x1, x2=None, outputs="trace")      # (n1, n2) or (n1, n2, c, c)
    a = ntk_alignment(model, reference, x)                  # KA(K_θ, K_ref)
    s = sign_similarity(model, reference, x)                # ReLU on/off agreement
    r = representation_alignment(model, reference, x)       # KA of R Rᵀ at the last linear input

Names are imported lazily so that ``import fasttangent`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ntk_gram": "fasttangent.ntk",
    "kernel_alignment": "fasttangent.metrics",
    "ntk_alignment": "fasttangent.metrics",
    "record_signs": "fasttangent.metrics",
    "sign_similarity": "fasttangent.metrics",
    "representations": "fasttangent.metrics",
    "representation_alignment": "fasttangent.metrics",
    "LinearityProbe": "fasttangent.metrics",
    "UndefinedMetricError": "fasttangent.metrics",
    "AlphaScaled": "fasttangent.alpha",
    "alpha_lr": "fasttangent.alpha",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fasttangent' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
