"""Benchmark: ft.ntk_gram(outputs="trace") vs torch.func and nngeometry, on CPU.

    .venv/bin/python bench/ntk_gram.py [--repeats 3] [--out bench/RESULTS.md]

Every (model, method) runs in its own subprocess with torch.set_num_threads(2):
- time: median wall time of ``--repeats`` runs (a third as many for the slow baselines)
  after one warm-up run;
- peak memory: the process's peak resident set size (``resource.getrusage(...).ru_maxrss``)
  minus its resident size just before the warm-up run (model and inputs built, the
  method's library imported), i.e. the extra memory the method needed at its peak;
- agreement: relative Frobenius error ‖K − K_baseline‖ / ‖K_baseline‖ of fasttangent's
  Gram against each baseline's.

Methods
- fasttangent: ``ft.ntk_gram(model, x, outputs="trace")`` (automatic block size, output
  chunks and layer forms within the default CPU memory budget, 256 MiB);
- fasttangent-1GiB: the same with ``memory_budget=1 GiB`` (more outputs per chunk);
- torch.func: per output k, J_k = vmap(jacrev(f_k), chunk_size=32) over the examples,
  then K += Σ_params J_k J_kᵀ (the Jacobian-contraction recipe of the torch.func tutorial);
- nngeometry 0.4: ``GramMatrix(model, loader)`` (full (c, n, c, n) Gram from per-example
  gradients via hooks; its trace over outputs), when the package is installed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

MODELS = {"mlp": 256, "cnn": 128}


def build(model_name: str):
    """Model (eval) and inputs, deterministic."""
    torch.manual_seed(0)
    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(3072, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        x = torch.randn(MODELS["mlp"], 3072)
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128 * 4 * 4, 10))
        x = torch.randn(MODELS["cnn"], 3, 32, 32)
    return model.eval(), x


def run_fasttangent(model, x):
    import fasttangent as ft
    return ft.ntk_gram(model, x, outputs="trace")


def run_fasttangent_large_budget(model, x):
    import fasttangent as ft
    return ft.ntk_gram(model, x, outputs="trace", memory_budget=LARGE_MEMORY_BUDGET)


def run_torch_func(model, x, chunk_size: int = 32):
    from torch.func import functional_call, jacrev, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}
    c = model(x[:1]).shape[1]
    K = torch.zeros(x.shape[0], x.shape[0])
    for k in range(c):
        def output_k(p, xi, k=k):
            return functional_call(model, p, (xi.unsqueeze(0),))[0, k]

        jac = vmap(jacrev(output_k), (None, 0), chunk_size=chunk_size)(params, x)
        for j in jac.values():
            j = j.reshape(x.shape[0], -1)
            K += j @ j.T
        del jac
    return K


def run_nngeometry(model, x):
    from nngeometry import GramMatrix
    from torch.utils.data import DataLoader, TensorDataset
    # one batch of all examples: nngeometry loops over pairs of batches and outputs, so
    # this is its fastest setting
    loader = DataLoader(TensorDataset(x, torch.zeros(x.shape[0])), batch_size=x.shape[0])
    G = GramMatrix(model, loader).data  # (c, n, c, n)
    return torch.einsum("aiaj->ij", G)


METHODS = {"fasttangent": run_fasttangent, "fasttangent-1GiB": run_fasttangent_large_budget,
           "torch.func": run_torch_func, "nngeometry": run_nngeometry}
LARGE_MEMORY_BUDGET = 1 << 30


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def worker(method: str, model_name: str, repeats: int, out_path: str) -> None:
    torch.set_num_threads(2)
    repeats = repeats if method.startswith("fasttangent") else max(1, repeats // 3)
    model, x = build(model_name)
    run = METHODS[method]
    # import the method's library first: its import (triton for fasttangent's kernels,
    # ~80 MiB) is not memory the computation needs
    importlib.import_module("fasttangent.kernels" if method.startswith("fasttangent") else
                            {"torch.func": "torch.func", "nngeometry": "nngeometry"}[method])
    rss_before = _current_rss_kib()
    K = run(model, x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        K = run(model, x)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    torch.save(K, out_path)
    print(json.dumps({"time_s": statistics.median(times), "times_s": times,
                      "peak_mib": (peak - rss_before) / 1024}))


def available(method: str) -> bool:
    if method != "nngeometry":
        return True
    try:
        import nngeometry  # noqa: F401
        return True
    except ImportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of fasttangent; baselines get a third as many (at least 1)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per (model, method) subprocess")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.repeats, args.worker[2])
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            results, grams = {}, {}
            for method in args.methods:
                if not available(method):
                    print(f"{model_name:4s} {method:12s} not installed, skipped", flush=True)
                    continue
                path = os.path.join(tmp, f"{model_name}-{method}.pt")
                try:
                    proc = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats),
                                           "--worker", method, model_name, path], timeout=args.timeout,
                                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
                except subprocess.TimeoutExpired:
                    print(f"{model_name:4s} {method:12s} did not finish within {args.timeout:.0f} s", flush=True)
                    rows.append((model_name, MODELS[model_name], method, float("inf"), float("nan"),
                                 float("nan"), float("nan")))
                    continue
                if proc.returncode != 0:
                    print(f"{model_name:4s} {method:12s} FAILED:\n{proc.stderr[-2000:]}", flush=True)
                    continue
                results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
                grams[method] = torch.load(path)
                print(f"{model_name:4s} {method:12s} {results[method]['time_s']:8.3f} s "
                      f"peak +{results[method]['peak_mib']:7.0f} MiB", flush=True)
            ours = grams.get("fasttangent")
            for method, res in results.items():
                ref = grams[method]
                error = float("nan") if ours is None else ((ours.double() - ref.double()).norm()
                                                          / ref.double().norm()).item()
                ours_time = results["fasttangent"]["time_s"] if "fasttangent" in results else float("nan")
                speedup = res["time_s"] / ours_time
                rows.append((model_name, MODELS[model_name], method, res["time_s"], res["peak_mib"], speedup, error))
    write_table(rows, args)


def write_table(rows, args) -> None:
    lines = [
        "# ft.ntk_gram benchmark (CPU)",
        "",
        f"`bench/ntk_gram.py`, torch {torch.__version__}, torch.set_num_threads(2), median of "
        f"{args.repeats} runs (baselines: {max(1, args.repeats // 3)}) after a warm-up run, "
        "outputs=\"trace\" (c = 10). Peak memory: peak RSS (`resource.getrusage` ru_maxrss) of a fresh "
        "subprocess per method minus its RSS before the first run (library imported). "
        "`speedup` = method time / fasttangent time; `rel. err.` = ‖K_ft − K_method‖_F / "
        "‖K_method‖_F.",
        "",
        "| model | n | method | time (s) | peak mem (MiB) | speedup of fasttangent | rel. err. |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name, n, method, t, mem, speedup, error in rows:
        if t == float("inf"):
            lines.append(f"| {model_name} | {n} | {method} | > {args.timeout:.0f} (stopped) | – | – | – |")
            continue
        lines.append(f"| {model_name} | {n} | {method} | {t:.3f} | {mem:.0f} | {speedup:.1f}× | {error:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
