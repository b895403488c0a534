#!/usr/bin/env bash
# One-shot GPU check of fasttangent on a CUDA machine (sized for an H200 lease: no step starts after
# GPU_CHECK_BUDGET_S = 420 s and step timeouts shrink to fit it, so about 8 min at most).
#
#   bench/gpu_check.sh [--dry-run] [--out DIR]
#
# Steps (each under its own timeout; a failing step is logged and the next one runs):
#   1. environment (GPU, driver, torch/triton versions)
#   2. build fasttangent._C with the machine's own torch (FASTTANGENT_BUILD_CUDA=1,
#      --no-build-isolation --no-deps: torch is never reinstalled)
#   3. GPU tests and timings, most important first: `pytest -m gpu tests/test_cuda_ext.py`,
#      bench/cuda_ext_bench.py (sign compare vs copy bandwidth, symmetric Gram vs torch.mm),
#      `pytest -m gpu` on the other tests (tests/test_triton_gpu.py: the compiled Triton kernels
#      against float64 references), tests/kernels (its conftest runs them in the interpreter)
#   4. per-op benchmarks bench/kernels/*.py, bench/ntk_gram.py --gpu (when it has that flag)
#   5. bench/gpu_report.py gathers everything into $OUT/bench/RESULTS-gpu.md
#
# Output (at most 8 files, as the device tool returns them): $OUT/summary.txt,
# $OUT/build.log, $OUT/tests.log, $OUT/bench.log, $OUT/cuda_ext_bench.json,
# $OUT/ntk_gram.md (when bench/ntk_gram.py has --gpu), $OUT/bench/RESULTS-gpu.md.
# --dry-run prints each step instead of running it (on any machine), then still runs
# the report generator on the empty logs.
set -uo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=0
OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT_DIR" ]; then
  OUT_DIR="$(mktemp -d /tmp/fasttangent-gpu-check.XXXXXX)"
fi
mkdir -p "$OUT_DIR/bench"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "$DRY_RUN" = 1 ]; then
  PY=.venv/bin/python  # a dry run here uses the project's venv for the report
fi
SUMMARY="$OUT_DIR/summary.txt"
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"  # no step starts after this many seconds,
GRACE_S=40                             # and none runs past BUDGET_S + GRACE_S
: > "$SUMMARY"
: > "$OUT_DIR/build.log"
: > "$OUT_DIR/tests.log"
: > "$OUT_DIR/bench.log"

# step NAME LOG TIMEOUT_S COMMAND...: run (or print) one step, record its status; the
# timeout shrinks so that no step outlives the script's budget.
step() {
  local name="$1" log="$2" limit="$3"
  shift 3
  if [ "$SECONDS" -ge "$BUDGET_S" ]; then
    echo "SKIP  $name (time budget of ${BUDGET_S}s spent)" | tee -a "$SUMMARY"
    return 0
  fi
  echo "=== $name: $*" >> "$log"
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY   $name: timeout $limit $*" | tee -a "$SUMMARY"
    return 0
  fi
  local start=$SECONDS rc
  local left=$((BUDGET_S + GRACE_S - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local status="OK"
  [ "$rc" -ne 0 ] && status="FAIL"
  [ "$rc" -eq 124 ] && status="TIMEOUT"
  echo "$status  $name (rc=$rc, $((SECONDS - start)) s, log $(basename "$log"))" | tee -a "$SUMMARY"
  return 0
}

export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

# 1. environment
step "environment" "$SUMMARY" 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
  $PY -c 'import torch, sys; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; \
  $PY -c 'import triton; print(\"triton\", triton.__version__)'; nvcc --version | tail -1"

# 2. build the extension against the machine's torch
step "build fasttangent._C" "$OUT_DIR/build.log" 240 env FASTTANGENT_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import torch, fasttangent._C" >/dev/null 2>&1; then
  # pip's editable machinery missing or broken there: build the module in place instead
  step "build fasttangent._C (fallback: setup.py build_ext --inplace)" "$OUT_DIR/build.log" 240 \
    env FASTTANGENT_BUILD_CUDA=1 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
fi
step "import fasttangent._C" "$OUT_DIR/build.log" 60 "$PY" -c \
  "import torch, fasttangent._C as ext; print('fasttangent._C loaded from', ext.__file__)"

# 3. tests
# the extension's own tests first, so that a hang elsewhere cannot cost their results
step "pytest -m gpu tests/test_cuda_ext.py" "$OUT_DIR/tests.log" 120 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
  tests/test_cuda_ext.py
# the extension's timings next (sign compare vs copy bandwidth, symmetric Gram vs torch.mm)
step "bench/cuda_ext_bench.py" "$OUT_DIR/bench.log" 120 "$PY" bench/cuda_ext_bench.py --json "$OUT_DIR/cuda_ext_bench.json"
step "pytest -m gpu tests (the rest)" "$OUT_DIR/tests.log" 180 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
  --ignore=tests/test_cuda_ext.py --ignore=tests/kernels tests
if [ -d tests/kernels ]; then
  step "pytest tests/kernels (Triton interpreter)" "$OUT_DIR/tests.log" 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/kernels
else
  echo "SKIP  pytest tests/kernels (no tests/kernels directory)" | tee -a "$SUMMARY"
fi

# 4. benchmarks
for bench in bench/kernels/[!_]*.py; do  # _common.py and the like are helpers, not benchmarks
  [ -e "$bench" ] || { echo "SKIP  bench/kernels/*.py (none found)" | tee -a "$SUMMARY"; break; }
  step "$bench" "$OUT_DIR/bench.log" 75 "$PY" "$bench"
done
if [ -f bench/ntk_gram.py ] && grep -q -- "--gpu" bench/ntk_gram.py; then
  ntk_out=()  # keep its table with the other results instead of in the device's copy of the repo
  grep -q -- '"--out"' bench/ntk_gram.py && ntk_out=(--out "$OUT_DIR/ntk_gram.md")
  step "bench/ntk_gram.py --gpu" "$OUT_DIR/bench.log" 240 "$PY" bench/ntk_gram.py --gpu "${ntk_out[@]}"
else
  echo "SKIP  bench/ntk_gram.py --gpu (missing, or it has no --gpu flag)" | tee -a "$SUMMARY"
fi

echo "total $SECONDS s; results in $OUT_DIR" | tee -a "$SUMMARY"

# 5. report (also in dry runs: it checks the report generator on the empty logs)
"$PY" bench/gpu_report.py --out "$OUT_DIR" >> "$SUMMARY" 2>&1 \
  || echo "FAIL  bench/gpu_report.py (see summary.txt)" | tee -a "$SUMMARY"
