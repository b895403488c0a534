"""backend="triton" on CPU tensors without the interpreter fails with a message naming the
fix, and so does turning the interpreter on after the kernels were defined. Both run in a
fresh interpreter process (this folder's conftest turns TRITON_INTERPRET on)."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, os
import torch
from fasttangent.kernels import (alignment_terms, count_sign_matches, factored_conv_gram, factored_dense_gram,
                                 gram, pack_signs, representation_alignment_terms)

x = torch.ones(4, 4)
calls = {
    "gram": lambda: gram(x, backend="triton"),
    "factored_dense_gram": lambda: factored_dense_gram(x, x[:, None], backend="triton"),
    "factored_conv_gram": lambda: factored_conv_gram(x[:, None], x[:, None, None], backend="triton"),
    "pack_signs": lambda: pack_signs(x, backend="triton"),
    "count_sign_matches": lambda: count_sign_matches(x, torch.zeros(1, dtype=torch.int32), backend="triton"),
    "alignment_terms": lambda: alignment_terms(x, x, backend="triton"),
    "representation_alignment_terms": lambda: representation_alignment_terms(x, x, backend="triton"),
}
messages = {}
for name, call in calls.items():
    try:
        call()
        messages[name] = "no error"
    except ValueError as error:
        messages[name] = str(error)
os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels were defined compiled
try:
    gram(x, backend="triton")
    messages["late"] = "no error"
except RuntimeError as error:
    messages["late"] = str(error)
print(json.dumps(messages))
'''


def test_triton_on_cpu_needs_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    messages = json.loads(done.stdout.strip().splitlines()[-1])
    late = messages.pop("late")
    for name, message in messages.items():
        assert name in message and "TRITON_INTERPRET=1" in message and "CUDA tensors" in message, (name, message)
    assert "set it before anything imports triton" in late, late


def test_old_triton_interpreter_with_new_numpy_is_named(monkeypatch):
    """Triton < 3.7's interpreter fails on NumPy 2.4 deep inside a loop: the launch check
    says which versions to use instead."""
    from fasttangent.kernels import _triton
    monkeypatch.setattr(_triton.triton, "__version__", "3.6.0")
    monkeypatch.setattr(_triton, "_numpy_version", lambda: "2.4.6")
    with pytest.raises(RuntimeError, match=r"triton>=3.7 or numpy<2.4"):
        _triton.check_launchable(None, "gram")
    monkeypatch.setattr(_triton, "_numpy_version", lambda: "2.3.5")
    assert not _triton._interpreter_breaks_on_numpy()
    monkeypatch.setattr(_triton.triton, "__version__", "3.7.0")
    monkeypatch.setattr(_triton, "_numpy_version", lambda: "2.4.6")
    assert not _triton._interpreter_breaks_on_numpy()
