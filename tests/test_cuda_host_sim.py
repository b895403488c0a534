"""The CUDA kernels' index logic on CPU: csrc/sign_mask.cu and csrc/sym_gram.cu compiled
with g++ against tests/cuda_sim/shim.h, which runs each CUDA thread as a std::thread.

The checks (tests/cuda_sim/sim_*.cpp) compare every kernel with plain loops: bit layout
and padding of the packed signs, agreement counts with garbage padding bits, Gram tiles
of odd sizes, mirrored tiles (exact symmetry), accumulation, misaligned rows, outputs
with a row stride, and outputs poisoned with NaN. Tests on a GPU: tests/test_cuda_ext.py.
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM = os.path.join(ROOT, "tests", "cuda_sim")
CXX = shutil.which(os.environ.get("CXX", "g++"))


@pytest.mark.slow  # about a minute: a 30 s compile, then a std::thread per simulated CUDA thread
@pytest.mark.skipif(CXX is None, reason="needs a C++20 compiler (g++ >= 12) to build the host simulation")
def test_cuda_kernels_match_loops_in_host_simulation(tmp_path):
    binary = tmp_path / "kernel_sim"
    compile_cmd = [CXX, "-std=c++20", "-O1", "-pthread", '-DFASTTANGENT_HOST_SIMULATION="shim.h"',
                   f"-I{SIM}", f"-I{os.path.join(ROOT, 'csrc')}", os.path.join(SIM, "main.cpp"),
                   os.path.join(SIM, "sim_sign.cpp"), os.path.join(SIM, "sim_gram.cpp"), "-o", str(binary)]
    built = subprocess.run(compile_cmd, capture_output=True, text=True, timeout=600)
    if built.returncode != 0 and ("barrier" in built.stderr or "_Float16" in built.stderr):
        pytest.skip(f"{CXX} lacks std::barrier or _Float16 (needs g++ >= 12): {built.stderr[-500:]}")
    assert built.returncode == 0, built.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.strip().endswith("0 failures") and "FAIL" not in run.stdout
