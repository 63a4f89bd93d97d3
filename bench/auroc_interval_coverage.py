"""Coverage of the AUROC confidence intervals (``lightning_modules/send/auroc_interval.py``) on simulated data whose
true AUROC is known: hallucinated scores ~ N(delta, 1), correct ones ~ N(0, 1), so AUROC = Phi(delta / sqrt 2).
For each class size and AUROC, SIMS data sets; per method the share of intervals that cover the truth (nominal:
--level) and their mean width, over the data sets that get an interval: perfect separation (AUROC 1, where every
method gives a point and the detection table gives none) is counted in a column of its own. Not a test;
docs/send.md, Evaluating hallucination detection, quotes the output.

    .venv/bin/python bench/auroc_interval_coverage.py --sims 1000
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from neurolight.lightning_modules.send.auroc_interval import INTERVALS, pairwise_wins

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--sims", type=int, default=1000, help="simulated data sets per (class sizes, AUROC)")
p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per interval")
p.add_argument("--level", type=float, default=0.95)
p.add_argument(
    "--sizes", default="10x10,20x20,40x40,10x50,50x10,100x100", help="hallucinated x correct, comma-separated"
)
p.add_argument("--aurocs", default="0.6,0.75,0.9,0.97")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
print(f"load average {os.getloadavg()[0]:.2f}; {args.sims} data sets per row, {args.resamples} resamples, "
      f"nominal {args.level:.0%}")  # fmt: skip
methods = list(INTERVALS)
print("| hallucinated x correct | AUROC | perfect separation | " + " | ".join(methods) + " |")
print("|---|---|---|" + "---|" * len(methods))
rng, start = np.random.default_rng(args.seed), time.time()
worst = dict.fromkeys(methods, 1.0)
for size in args.sizes.split(","):
    m, n = (int(x) for x in size.split("x"))
    positive = np.r_[np.ones(m, bool), np.zeros(n, bool)]
    for truth in (float(a) for a in args.aurocs.split(",")):
        delta = math.sqrt(2) * NormalDist().inv_cdf(truth)
        covered, width, perfect = dict.fromkeys(methods, 0), dict.fromkeys(methods, 0.0), 0
        for sim in range(args.sims):
            wins = pairwise_wins(np.r_[rng.normal(delta, 1, m), rng.normal(0, 1, n)], positive)
            if wins.mean() in (0.0, 1.0):
                perfect += 1
                continue
            for name, interval in INTERVALS.items():
                low, high = interval.compute(wins, args.level, args.resamples, sim)
                covered[name] += low <= truth <= high
                width[name] += high - low
        rated = args.sims - perfect
        for name in methods:
            worst[name] = min(worst[name], covered[name] / rated)
        cells = " | ".join(f"{covered[k] / rated:.3f} ({width[k] / rated:.3f})" for k in methods)
        print(f"| {m} x {n} | {truth:.2f} | {perfect / args.sims:.3f} | {cells} |", flush=True)
print("coverage (mean width); lowest coverage: " + ", ".join(f"{k} {v:.3f}" for k, v in worst.items()))
print(f"{time.time() - start:.0f} s; load average {os.getloadavg()[0]:.2f}")
