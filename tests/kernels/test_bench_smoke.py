"""Every per-op benchmark script runs end to end in its --smoke mode (CPU, interpreter)
and prints a markdown table with one row per case."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "bench" / "kernels").glob("bench_*.py"))

# one process for all scripts: importing torch and triton dominates a smoke run
RUNNER = r'''
import runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--smoke"]
    print("##", script, flush=True)
    runpy.run_path(script, run_name="__main__")
'''


@pytest.mark.slow  # about 30 s: five scripts' worth of interpreted kernels
def test_benchmarks_run_in_smoke_mode():
    assert {p.stem for p in SCRIPTS} >= {"bench_gram", "bench_factored_dense_gram", "bench_factored_conv_gram",
                                         "bench_sign_mask", "bench_alignment"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # --smoke must set it itself
    env["PYTHONPATH"] = str(ROOT / "bench" / "kernels")
    done = subprocess.run([sys.executable, "-c", RUNNER, *map(str, SCRIPTS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sections = done.stdout.split("## ")[1:]
    assert len(sections) == len(SCRIPTS)
    for section in sections:
        lines = section.strip().splitlines()
        rows = [line for line in lines[3:] if line.startswith("| ")]
        assert lines[1].startswith("| op |") and rows, section
        assert all(line.count("|") == lines[1].count("|") for line in rows), section
