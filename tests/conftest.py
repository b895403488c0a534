"""Session-wide test set-up.

Triton decides between compiled and interpreted kernels when ``triton`` is first
imported, so the interpreter switch must be set before any test module imports it.
Without a GPU, Triton kernels can only run in the interpreter (on CPU tensors).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
