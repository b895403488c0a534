"""Gather the logs of bench/gpu_check.sh into one markdown report, ``OUT/bench/RESULTS-gpu.md``.

Reads OUT/summary.txt (step statuses), OUT/build.log, OUT/tests.log, OUT/bench.log,
OUT/cuda_ext_bench.json and OUT/ntk_gram.md; any of them may be missing or empty (a step that failed or
never ran), which the report says instead of failing.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

PYTEST_RESULT = re.compile(r"^=*\s*(\d+ (passed|failed|skipped|error|errors|deselected).*?)\s*=*$")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def pytest_results(log: str) -> list[str]:
    """The final 'N passed, M skipped in Ts' line of every pytest run in the log."""
    return [m.group(1) for line in log.splitlines() if (m := PYTEST_RESULT.match(line.strip()))]


def failures(log: str, limit: int = 30) -> list[str]:
    """FAILED/ERROR lines of pytest's short summary."""
    return [line for line in log.splitlines() if line.startswith(("FAILED", "ERROR"))][:limit]


def markdown_tables(log: str) -> list[str]:
    """Markdown table lines, '###' headings and PASS/MISS lines the benchmarks printed,
    under a heading per benchmark (gpu_check.sh starts each step's log with '=== name: command')."""
    lines = []
    for line in log.splitlines():
        if line.startswith("=== "):
            lines += ["", f"#### {line[4:].split(':', 1)[0]}", ""]
        elif line.startswith(("|", "- PASS", "- MISS")):
            lines.append(line)
        elif line.startswith("###"):
            lines += [line, ""]
    return lines


def build_tail(log: str, lines: int = 15) -> list[str]:
    interesting = [line for line in log.splitlines() if not line.startswith("===") and re.search(r"error|warning: |fasttangent._C loaded", line, re.I)]
    return interesting[-lines:]


def report(out: Path) -> str:
    summary = read(out / "summary.txt")
    tests, bench, build = read(out / "tests.log"), read(out / "bench.log"), read(out / "build.log")
    bench_json = out / "cuda_ext_bench.json"
    checks = json.loads(bench_json.read_text())["checks"] if bench_json.is_file() else []
    lines = ["# fasttangent GPU check", "", "## Steps", "", "```", summary.strip() or "(no summary)", "```", ""]
    lines += ["## Build", ""] + [f"    {line}" for line in build_tail(build)] + [""]
    lines += ["## Tests", ""] + ([f"- {r}" for r in pytest_results(tests)] or ["- (no pytest result line)"])
    lines += [""] + [f"    {line}" for line in failures(tests)] + [""]
    lines += ["## Targets", ""]
    lines += [f"- {'PASS' if c['passed'] else 'MISS'}: {c['name']}: {c['value']}" for c in checks] or [
        "- (cuda_ext_bench.py wrote no results)"]  # the `or` applies to the new list alone
    lines += ["", "## Benchmarks", ""] + (markdown_tables(bench) or ["(no benchmark tables)"])
    ntk = read(out / "ntk_gram.md")
    if ntk:
        lines += ["", "## bench/ntk_gram.py --gpu", "", ntk.strip()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the directory gpu_check.sh wrote to")
    args = parser.parse_args(argv)
    target = args.out / "bench" / "RESULTS-gpu.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(report(args.out))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
