"""Kernel tests run the Triton kernels in the CPU interpreter.

``triton.jit`` picks compiled or interpreted code when a function is *defined*: Triton's
own library when ``triton`` is imported, the kernels when ``fasttangent.kernels`` is. So
TRITON_INTERPRET=1 is set here, before any test module of this folder imports either.
pytest loads this file when it reaches tests/kernels/, which sorts before the tests/test_*.py
modules; a module collected earlier that imports triton would make the kernel tests fail
with the RuntimeError of ``fasttangent.kernels._triton.check_launchable`` saying so.
"""
import importlib.util
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# without Triton (it is a test extra) there is nothing to test here
collect_ignore_glob = [] if importlib.util.find_spec("triton") else ["test_*.py"]


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
