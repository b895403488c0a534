"""Benchmark: ft.ntk_gram vs torch.func and nngeometry, all methods in one run.

    .venv/bin/python bench/ntk_gram.py [--repeats 3] [--cap-seconds 300] [--out bench/RESULTS.md]
    python bench/ntk_gram.py --gpu [--out ntk_gram.md]     # CUDA: CIFAR ResNet18
    python bench/ntk_gram.py --gpu --dry-run               # the GPU code path, tiny, on CPU

CPU mode (the default). Every (model, method) runs in two fresh subprocesses with
torch.set_num_threads(2), all in this one invocation, which writes the whole table:
- every worker imports the same libraries (torch.func, fasttangent with its kernels and
  triton, nngeometry when installed) and runs its method once on 2 examples (loading
  lazily initialized code), so that imports and one-off costs are alike for all methods;
- time (the first process): median of ``--repeats`` timed runs for fasttangent, one timed
  run for the baselines (they take minutes), under the default allocator settings;
- peak memory (the second process): the kernel's peak resident set size (VmHWM, reset
  through /proc/self/clear_refs just before the run) during one run, minus the resident
  size at the reset. This process runs with MALLOC_MMAP_THRESHOLD_=1 MiB, so that glibc
  returns freed large buffers at once and the resident size follows the live tensors;
  since that makes every large allocation fault in fresh pages (slowing every method,
  by up to 2x), it is not timed;
- time cap: a timed run still going after ``--cap-seconds`` is stopped and reported as
  "> cap"; the method is then timed at a small n and that time is scaled linearly in n to
  the full n, labelled as an extrapolation (a lower estimate when the cost grows faster);
- agreement: ‖K_ft − K_method‖_F / ‖K_method‖_F against fasttangent's Gram.

GPU mode (``--gpu``, for bench/gpu_check.sh): one process on the CUDA device, the paper's
CIFAR ResNet18 (``fasttangent.models.cifar_resnet18``), n = 1000 with outputs="trace" and
n = 100 with outputs="full"; median of ``--repeats`` runs after a warm-up run, timed with
torch.cuda.synchronize; peak memory from torch.cuda.max_memory_allocated. A method whose
warm-up run exceeds ``--cap-seconds`` is not repeated. ``--dry-run`` runs the same code on
the CPU with n = 2 and 1.

Methods
- fasttangent: ``ft.ntk_gram(model, x, outputs=...)`` (automatic block size, output chunks
  and layer forms within the default memory budget);
- torch.func: per output k, J_k = vmap(jacrev(f_k), chunk_size=32) over the examples,
  then K += Σ_params J_k J_kᵀ (the Jacobian-contraction recipe of the torch.func
  tutorial; for "full", the Jacobian of all outputs);
- nngeometry 0.4: ``GramMatrix(model, loader)`` (full (c, n, c, n) Gram from per-example
  gradients via hooks; its trace over outputs for "trace"), when the package is installed.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

MODELS = {"mlp": 256, "cnn": 128, "vit": 64, "gpt": 64}
MODEL_LABELS = {"mlp": "MLP 3072→512→512→10", "cnn": "CNN 32-64-128 conv3×3 + max-pool, linear (CIFAR)",
                "vit": "ViT (torchvision) patch 4, 4 layers, width 128, 4 heads (CIFAR)",
                "gpt": "nanoGPT-style char model: 2 layers, width 64, 4 heads, 32 tokens, tied head, 65 outputs"}
METHOD_NAMES = ("fasttangent", "torch.func", "nngeometry")
WARMUP_EXAMPLES = 2
SMALL_N = {"mlp": 16, "cnn": 4, "vit": 4, "gpt": 4}  # sizes for the extrapolation of a capped baseline
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # memory workers only


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention as nanoGPT writes it: one Linear for q, k, v, SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.heads = heads

    def forward(self, x):
        n, T, width = x.shape
        q, k, v = (t.view(n, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, T, width))


class CharGPT(nn.Module):
    """A nanoGPT-style character model: token and position embeddings (the positions as
    wpe(arange(T)), shared by all examples), pre-norm blocks, a head tied to the token
    embedding; the logits of the next character after the last position."""

    def __init__(self, vocab=65, block=32, layers=2, heads=4, width=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=nn.LayerNorm(width), attn=CausalSelfAttention(width, heads), ln_2=nn.LayerNorm(width),
            mlp=nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))))
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = x + b["attn"](b["ln_1"](x))
            x = x + b["mlp"](b["ln_2"](x))
        return self.head(self.ln_f(x[:, -1]))


def build(model_name: str, n: int):
    """Model (eval) and n inputs, deterministic."""
    torch.manual_seed(0)
    if model_name == "gpt":  # shared position embeddings, a tied head (no target: a reference row)
        return CharGPT().eval(), torch.randint(0, 65, (n, 32))
    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(3072, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        x = torch.randn(n, 3072)
    elif model_name == "vit":  # attention, a class token and a position embedding (no target: a reference row)
        from torchvision.models import VisionTransformer
        model = VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128,
                                  mlp_dim=256, num_classes=10)
        x = torch.randn(n, 3, 32, 32)
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128 * 4 * 4, 10))
        x = torch.randn(n, 3, 32, 32)
    return model.eval(), x


# ------------------------------------------------------------------------------------
# Methods: run(model, x, outputs) -> (n, n) for "trace", (n, n, c, c) for "full".

def run_fasttangent(model, x, outputs="trace"):
    import fasttangent as ft
    return ft.ntk_gram(model, x, outputs=outputs)


def run_torch_func(model, x, outputs="trace", chunk_size: int = 32):
    from torch.func import functional_call, jacrev, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}
    n = x.shape[0]
    if outputs == "full":
        def all_outputs(p, xi):
            return functional_call(model, p, (xi.unsqueeze(0),))[0]

        jac = vmap(jacrev(all_outputs), (None, 0), chunk_size=chunk_size)(params, x)
        c = next(iter(jac.values())).shape[1]
        K = torch.zeros(n * c, n * c, device=x.device)
        for j in jac.values():
            j = j.reshape(n * c, -1)
            K += j @ j.T
        return K.view(n, c, n, c).permute(0, 2, 1, 3)
    c = model(x[:1]).shape[1]
    K = torch.zeros(n, n, device=x.device)
    for k in range(c):
        def output_k(p, xi, k=k):
            return functional_call(model, p, (xi.unsqueeze(0),))[0, k]

        jac = vmap(jacrev(output_k), (None, 0), chunk_size=chunk_size)(params, x)
        for j in jac.values():
            j = j.reshape(n, -1)
            K += j @ j.T
        del jac
    return K


def run_nngeometry(model, x, outputs="trace"):
    from nngeometry import GramMatrix
    from torch.utils.data import DataLoader, TensorDataset
    # one batch of all examples: nngeometry loops over pairs of batches and outputs, so
    # this is its fastest setting
    loader = DataLoader(TensorDataset(x, torch.zeros(x.shape[0], device=x.device)), batch_size=x.shape[0])
    G = GramMatrix(model, loader).data  # (c, n, c, n)
    return G.permute(1, 3, 0, 2) if outputs == "full" else torch.einsum("aiaj->ij", G)


METHODS = {"fasttangent": run_fasttangent, "torch.func": run_torch_func, "nngeometry": run_nngeometry}


def available(method: str) -> bool:
    if method != "nngeometry":
        return True
    try:
        import nngeometry  # noqa: F401
        return True
    except ImportError:
        return False


def relative_error(K, ref) -> float:
    return ((K.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


# ------------------------------------------------------------------------------------
# CPU workers (one fresh subprocess per model, method and n).

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line; the memory measurement needs Linux")


def _reset_peak_rss() -> None:
    """Release freed heap memory to the kernel, then restart the kernel's peak-RSS count."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(method: str, model_name: str, n: int, repeats: int, out_path: str, marker: str, mode: str) -> None:
    """One method on one model, in its own process: ``mode="time"`` times ``repeats`` runs
    (under the default allocator, as users run) and saves the Gram; ``mode="memory"``
    measures the peak resident memory of one run (under ``MALLOC_ENV``)."""
    torch.set_num_threads(2)
    for module in ("torch.func", "fasttangent", "fasttangent.kernels", "triton"):
        importlib.import_module(module)
    if available("nngeometry"):
        importlib.import_module("nngeometry")
    model, x = build(model_name, n)
    run = METHODS[method]
    try:
        run(model, x[:WARMUP_EXAMPLES])
    except Exception as error:  # a baseline that does not support the model's layers
        if method == "fasttangent":
            raise
        print(json.dumps({"unsupported": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}))
        return
    _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    with open(marker, "w") as f:  # the parent's time cap counts from here
        f.write(str(time.time()))
    if mode == "memory":
        run(model, x)
        print(json.dumps({"peak_mib": (_status_kib("VmHWM") - rss_before) / 1024}))
        return
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        K = run(model, x)
        times.append(time.perf_counter() - start)
    torch.save(K, out_path)
    print(json.dumps({"time_s": statistics.median(times), "times_s": times}))


def run_worker(method: str, model_name: str, n: int, repeats: int, cap: float, tmp: str, mode: str = "time"):
    """The JSON result of one worker subprocess ({"time_s", "K"} or {"peak_mib"}), or
    {"capped": True} after ``cap`` seconds a run."""
    tag = f"{model_name}-{method}-{n}-{mode}"
    out_path, marker = os.path.join(tmp, tag + ".pt"), os.path.join(tmp, tag + ".started")
    runs = repeats if mode == "time" else 1
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(MALLOC_ENV if mode == "memory" else {})}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", method, model_name, str(n),
                             str(repeats), out_path, marker, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    started = None
    while proc.poll() is None:
        time.sleep(0.5)
        if started is None and os.path.exists(marker):
            started = time.time()
        if started is not None and time.time() - started > cap * runs:
            proc.kill()
            proc.communicate()
            return {"capped": True}
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    if mode == "time" and "unsupported" not in result:
        result["K"] = torch.load(out_path)
    return result


def cpu_benchmark(args) -> None:
    methods = [m for m in args.methods if available(m)]
    skipped = [m for m in args.methods if m not in methods]
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            n = MODELS[model_name]
            results = {}
            for method in methods:
                repeats = args.repeats if method == "fasttangent" else 1
                res = run_worker(method, model_name, n, repeats, args.cap_seconds, tmp)
                if res.get("unsupported"):
                    results[method] = res
                    print(f"{model_name:4s} n={n} {method:12s} unsupported: {res['unsupported']}", flush=True)
                    continue
                if not res.get("capped"):
                    memory = run_worker(method, model_name, n, repeats, args.cap_seconds, tmp, mode="memory")
                    res["peak_mib"] = None if memory.get("capped") else memory["peak_mib"]
                if res.get("capped"):
                    small = SMALL_N[model_name]
                    probe = run_worker(method, model_name, small, 1, args.cap_seconds, tmp)
                    res["small_n"] = small
                    res["small_time_s"] = None if probe.get("capped") else probe["time_s"]
                results[method] = res
                shown = (f"> {args.cap_seconds:.0f} s (capped)" if res.get("capped")
                         else f"{res['time_s']:.3f} s, peak {_fmt_mib(res['peak_mib'])} MiB")
                print(f"{model_name:4s} n={n} {method:12s} {shown}  [{time.time() - started:.0f} s]", flush=True)
            rows.append((model_name, n, results))
    write_cpu_table(rows, args, skipped, time.time() - started)


def _fmt_mib(peak) -> str:
    return "–" if peak is None else f"{peak:.0f}"


def _fmt_time(t: float) -> str:
    return f"{t:.3f}" if t < 10 else f"{t:.1f}"


def write_cpu_table(rows, args, skipped, wall_s: float) -> None:
    lines = [
        "# ft.ntk_gram benchmark (CPU)",
        "",
        f"`bench/ntk_gram.py --cap-seconds {args.cap_seconds:.0f} --repeats {args.repeats}` (`make bench`): "
        f"one invocation measured every row below ({wall_s / 60:.1f} min). torch {torch.__version__}, "
        "torch.set_num_threads(2), outputs=\"trace\" (c = 10), float32. Each (model, method) ran in two fresh "
        "subprocesses, one for time and one for memory; each imported the same libraries (torch.func, "
        f"fasttangent + triton, nngeometry) and ran its method once on {WARMUP_EXAMPLES} examples first.",
        "",
        f"- time: median of {args.repeats} runs for fasttangent, 1 run for the baselines, under the default "
        "allocator settings;",
        "- peak MiB: in the memory process, the peak resident set size during one run (VmHWM, reset through "
        "/proc/self/clear_refs) minus the resident size just before it, with glibc's "
        "MALLOC_MMAP_THRESHOLD_=1 MiB so that freed tensors leave the resident set (this setting turns "
        "every large allocation into fresh pages, which slows all methods, so no time is taken there);",
        "- speed-up: method time / fasttangent time; rel. err.: ‖K_ft − K_method‖_F / ‖K_method‖_F;",
        f"- a baseline still running after {args.cap_seconds:.0f} s is stopped (\"> cap\"); its time at a small "
        "n, scaled linearly to the full n, is given as an extrapolation (labelled as such).",
        "",
        "| model | n | method | time (s) | peak MiB | speed-up of fasttangent | rel. err. |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for model_name, n, results in rows:
        ours = results.get("fasttangent")
        for method, res in results.items():
            label = "**fasttangent**" if method == "fasttangent" else method
            if res.get("unsupported"):
                lines.append(f"| {MODEL_LABELS[model_name]} | {n} | {label} | fails on this model "
                             f"({res['unsupported']}) | – | – | – |")
                continue
            if res.get("capped"):
                small_t = res.get("small_time_s")
                if small_t is None:
                    extra = f"n={res['small_n']} also over the cap"
                else:
                    extra = (f"extrapolated ≈ {small_t * n / res['small_n']:.0f} s "
                             f"(n={res['small_n']}: {small_t:.1f} s, × {n}/{res['small_n']})")
                speed = "–" if ours is None else f"> {args.cap_seconds / ours['time_s']:.0f}×"
                lines.append(f"| {MODEL_LABELS[model_name]} | {n} | {label} | > {args.cap_seconds:.0f} (capped; "
                             f"{extra}) | – | {speed} | – |")
                continue
            speed = "–" if ours is None else f"{res['time_s'] / ours['time_s']:.1f}×"
            err = "–" if ours is None or method == "fasttangent" else f"{relative_error(ours['K'], res['K']):.1e}"
            lines.append(f"| {MODEL_LABELS[model_name]} | {n} | {label} | {_fmt_time(res['time_s'])} | "
                         f"{_fmt_mib(res['peak_mib'])} | {speed} | {err} |")
        if ours is not None:
            verdicts.append(_verdict(model_name, ours, results, args))
    if skipped:
        lines += ["", f"Not installed, skipped: {', '.join(skipped)}."]
    lines += ["", "Targets: " + "; ".join(verdicts) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    notes = _hand_notes(args.out)
    with open(args.out, "w") as f:
        f.write(text)
        if notes:
            f.write("\n(The notes below are kept from the previous file and describe an earlier run; "
                    "check them against the table above.)\n\n" + notes)


# hand-written notes below the table start with this; a new run keeps them
NOTES_HEADING = "Notes (written by hand"


def _hand_notes(path: str) -> str:
    """The hand-written notes (from their heading on) of an existing results file, or ''."""
    try:
        text = open(path).read()
    except OSError:
        return ""
    at = text.find(NOTES_HEADING)
    return text[at:] if at >= 0 else ""


SPEED_TARGETS = {"mlp": 25.0, "cnn": 3.0}


def _verdict(model_name, ours, results, args) -> str:
    """One clause: speed-up over the fastest baseline and memory against the lowest, met or not."""
    baselines = {m: r for m, r in results.items() if m != "fasttangent" and not r.get("unsupported")}
    finished = {m: r for m, r in baselines.items() if not r.get("capped")}
    if not baselines:
        return f"{model_name}: no baseline ran"
    if finished:
        fastest = min(finished, key=lambda m: finished[m]["time_s"])
        speedup = finished[fastest]["time_s"] / ours["time_s"]
    else:
        fastest, speedup = "every baseline (capped)", args.cap_seconds / ours["time_s"]
    target = SPEED_TARGETS.get(model_name)
    speed = (f"{speedup:.1f}× over {fastest} (no target)" if target is None else
             f"{speedup:.1f}× over {fastest} (target ≥ {target:.0f}×: {'met' if speedup >= target else 'NOT met'})")
    if not finished:
        return f"{model_name}: {speed}; memory not comparable (no baseline finished)"
    leanest = min(finished, key=lambda m: finished[m]["peak_mib"])
    ok = ours["peak_mib"] <= finished[leanest]["peak_mib"]
    memory = (f"peak {ours['peak_mib']:.0f} MiB vs {finished[leanest]['peak_mib']:.0f} MiB of {leanest}, the "
              f"lowest finished baseline (target ≤: {'met' if ok else 'NOT met'})")
    return f"{model_name}: {speed}, {memory}"


# ------------------------------------------------------------------------------------
# GPU mode.

GPU_CASES = (("trace", 1000), ("full", 100))
CPU_CAP_SECONDS, GPU_CAP_SECONDS = 300.0, 15.0  # the GPU step of bench/gpu_check.sh has 90 s in all


def _timed(run, model, x, outputs, repeats: int, cap: float, device):
    """(median seconds, peak bytes above the start, Gram) after a warm-up run."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    K = run(model, x, outputs)
    sync()
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats if first <= cap else 0):
        del K
        sync()
        start = time.perf_counter()
        K = run(model, x, outputs)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" and times else float("nan")
    return (statistics.median(times) if times else first), peak, K, bool(times)


def gpu_benchmark(args) -> None:
    from fasttangent.models import cifar_resnet18
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (torch.cuda.is_available() is False); "
                         "use --gpu --dry-run to exercise this code path on the CPU")
    torch.manual_seed(0)
    model = cifar_resnet18(num_classes=10).to(device).eval()
    methods = [m for m in args.methods if available(m)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    lines = [f"# ft.ntk_gram on {name}: CIFAR ResNet18 (fasttangent.models.cifar_resnet18)", "",
             f"torch {torch.__version__}, float32; median of {args.repeats} runs after a warm-up run "
             "(torch.cuda.synchronize around each); peak MiB: torch.cuda.max_memory_allocated above the "
             f"allocation before the timed runs. A method whose warm-up took over {args.cap_seconds:.0f} s "
             "is reported with that single time.", "",
             "| outputs | n | method | time (s) | peak MiB | speed-up of fasttangent | rel. err. |",
             "|---|---|---|---|---|---|---|"]
    for outputs, n in GPU_CASES:
        n = (2 if outputs == "trace" else 1) if args.dry_run else n
        x = torch.randn(n, 3, 32, 32, device=device)
        results = {}
        for method in methods:
            try:
                t, peak, K, repeated = _timed(METHODS[method], model, x, outputs, args.repeats, args.cap_seconds,
                                              device)
            except torch.cuda.OutOfMemoryError:
                lines.append(f"| {outputs} | {n} | {method} | out of memory | – | – | – |")
                torch.cuda.empty_cache()
                continue
            K = K.cpu()
            results[method] = (t, peak, K)
            print(f"{outputs} n={n} {method}: {t:.3f} s, peak {peak / 2**20:.0f} MiB", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ours = results.get("fasttangent")
            speed = "–" if ours is None else f"{t / ours[0]:.1f}×"
            err = "–" if ours is None or method == "fasttangent" else f"{relative_error(ours[2], K):.1e}"
            note = "" if repeated else " (1 run)"
            lines.append(f"| {outputs} | {n} | {method} | {t:.3f}{note} | {peak / 2**20:.0f} | {speed} | {err} |")
            _write(lines, args.out)  # after every row: a step timeout must not lose the rows measured
    print("\n".join(lines))


def _write(lines, path) -> None:
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of fasttangent (CPU; baselines run once) or of every method (GPU)")
    parser.add_argument("--cap-seconds", type=float, default=None,
                        help="CPU (default 300): stop a timed run after this many seconds and report '> cap'; "
                             "GPU (default 15): do not repeat a method whose warm-up took longer")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=list(METHOD_NAMES))
    parser.add_argument("--out", default=None,
                        help="markdown table path (default: bench/RESULTS.md on CPU, none with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="CUDA benchmark on the CIFAR ResNet18")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: the same code on the CPU, n = 2 and 1")
    parser.add_argument("--worker", nargs=7, metavar=("METHOD", "MODEL", "N", "REPEATS", "OUT", "MARKER", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, model_name, n, repeats, out_path, marker, mode = args.worker
        worker(method, model_name, int(n), int(repeats), out_path, marker, mode)
        return
    if args.cap_seconds is None:
        args.cap_seconds = GPU_CAP_SECONDS if args.gpu else CPU_CAP_SECONDS
    if args.gpu:
        gpu_benchmark(args)
        return
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    cpu_benchmark(args)


if __name__ == "__main__":
    main()
