"""Command line: ``fasttangent train CONFIG.toml``, ``fasttangent reproduce ID``,
``fasttangent plot RUN_DIR``."""
from __future__ import annotations

import argparse
import importlib
import sys

from .reproduce import EXPERIMENTS


def _reproduce(argv):
    if not argv or argv[0] in ("-h", "--help"):
        lines = "\n".join(f"  {k:<11} {v}" for k, v in EXPERIMENTS.items())
        print(f"usage: fasttangent reproduce ID [options]\n\nexperiments:\n{lines}")
        return 0 if argv else 2
    exp_id, rest = argv[0], argv[1:]
    if exp_id not in EXPERIMENTS:
        print(f"error: unknown experiment {exp_id!r}; choose one of {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"fasttangent.reproduce.{exp_id}")
    except ModuleNotFoundError as e:
        if e.name != f"fasttangent.reproduce.{exp_id}":
            raise
        print(f"error: experiment {exp_id!r} is not available in this version", file=sys.stderr)
        return 2
    return module.main(rest)


def _train(argv):
    from .train import main as train_main
    return train_main(argv)


def _plot(argv):
    from .train import plot_main
    return plot_main(argv)


COMMANDS = {"reproduce": _reproduce, "train": _train, "plot": _plot}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="fasttangent", description="Tangent metrics and 'Lazy vs hasty' reproductions")
        parser.add_argument("command", choices=sorted(COMMANDS))
        parser.print_help()
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
