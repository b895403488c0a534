"""Paper reproductions, one module per experiment id, each exposing
``main(argv: list[str]) -> int`` (its own argparse) and a one-line ``DESCRIPTION``.
``fasttangent reproduce <id> ...`` imports ``fasttangent.reproduce.<id>`` and calls ``main``.
"""
EXPERIMENTS = {
    "yinyang": "Fig. 1: yin-yang task, alpha = 1 vs 100",
    "quadratic": "Fig. 4 and Fig. 14: the solvable quadratic model of Section 4",
    "cscores": "Fig. 2 top: loss per C-score decile",
    "labelnoise": "Fig. 2 bottom: clean vs noisy examples",
    "celeba": "Fig. 3 top: spurious correlation, CelebA (or its CPU stand-in)",
    "waterbirds": "Fig. 3 bottom: spurious correlation, Waterbirds (or its CPU stand-in)",
}
