"""Every Triton kernel compiles for a Hopper GPU (sm_90, the H200 of the benchmarks) down to
a cubin, without a GPU: Triton's compiler and its bundled ptxas run on the CPU. The
interpreter tests prove the arithmetic; this proves the same code is valid compiled Triton
(types, atomics, int64 offsets, constexpr branches), and that 16-bit Grams use tensor cores."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (module, kernel, pointer dtypes, constexprs, num_warps): the launch configurations of the host wrappers
CASES = [
    ("gram", "_gram_kernel", {"j1_ptr": "*fp32", "j2_ptr": "*fp32", "out_ptr": "*fp32", "pairs_ptr": "*i32"},
     dict(SYMMETRIC=True, ACCUMULATE=True, ATOMIC=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, INPUT_PRECISION="ieee",
          UPCAST=False), 8),
    ("gram", "_gram_kernel", {"j1_ptr": "*bf16", "j2_ptr": "*bf16", "out_ptr": "*fp64", "pairs_ptr": "*i32"},
     dict(SYMMETRIC=False, ACCUMULATE=False, ATOMIC=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, INPUT_PRECISION="tf32",
          UPCAST=False), 4),
    ("factored_dense_gram", "_factored_dense_kernel",
     {"a1_ptr": "*bf16", "g1_ptr": "*fp32", "a2_ptr": "*bf16", "g2_ptr": "*fp32", "out_ptr": "*fp32", "pairs_ptr": "*i32"},
     dict(SYMMETRIC=True, ACCUMULATE=True, BLOCK_M=64, BLOCK_N=64, BLOCK_DA=32, BLOCK_DG=32, PRECISION_A="tf32",
          PRECISION_G="ieee", UPCAST=False), 4),
    ("factored_conv_gram", "_factored_conv_kernel",
     {"a1_ptr": "*fp32", "g1_ptr": "*fp32", "a2_ptr": "*fp32", "g2_ptr": "*fp32", "out_ptr": "*fp32", "pairs_ptr": "*i32"},
     dict(SYMMETRIC=True, ACCUMULATE=True, BLOCK_T=64, BLOCK_S=64, BLOCK_DA=32, BLOCK_DG=32, PRECISION_A="ieee",
          PRECISION_G="ieee", UPCAST=False), 4),
    ("sign_mask", "_pack_signs_kernel", {"x_ptr": "*bf16", "packed_ptr": "*i32"}, dict(BLOCK_WORDS=128), 4),
    ("sign_mask", "_count_mismatches_kernel", {"x_ptr": "*fp32", "packed_ptr": "*i32", "count_ptr": "*i64"},
     dict(BLOCK_WORDS=128), 4),
    ("alignment", "_margins_kernel", {"k1_ptr": "*bf16", "k2_ptr": "*bf16", "rows_ptr": "*fp64", "cols_ptr": "*fp64"},
     dict(BLOCK_R=64, BLOCK_C=64), 4),
    ("alignment", "_alignment_kernel",
     {"k1_ptr": "*fp32", "k2_ptr": "*fp64", "means_ptr": "*fp64", "partial_ptr": "*fp64"},
     dict(CENTERED=True, BLOCK_R=64, BLOCK_C=64), 4),
]

COMPILER = r'''
import importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

results = []
for module, name, pointers, constexprs, num_warps in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module("fasttangent.kernels." + module), name)
    signature = {a: pointers.get(a) or ("constexpr" if a in constexprs else "i32") for a in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(a),): v for a, v in constexprs.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})
    results.append({"kernel": name, "cubin": len(kernel.asm["cubin"]),
                    "wgmma": len(re.findall(r"wgmma\.mma_async", kernel.asm["ptx"]))})
print(json.dumps(results))
'''


@pytest.mark.slow  # about a minute of compilation
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    done = subprocess.run([sys.executable, "-c", COMPILER, json.dumps(CASES)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in results] == [case[1] for case in CASES]
    assert all(r["cubin"] > 0 for r in results)
    assert results[1]["wgmma"] > 0, "a bfloat16 Gram should run on Hopper tensor cores (wgmma)"
    assert results[0]["wgmma"] == 0, "an exact float32 Gram (TF32 off) must not use tensor cores"
