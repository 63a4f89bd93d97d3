"""Exact EigenScore against the efficient estimate at the SEND paper's sizes, on four matrix families, float32.

    .venv/bin/python bench/eigenscore.py [--quick] [--sizes 5000x5000,10000x5000,20000x5000] [--method auto]

For every size K x d (K answer embeddings of dimension d) and family, one seeded matrix; prints the time of
``eigenscore`` (Gram of the smaller side + Cholesky), the time of ``efficient_eigenscore`` (default settings, fixed
seed), the speed-up, the relative error of the estimate against the exact score, its own standard-error estimate
and the path that ran (method / reason, probes x Lanczos steps). ``--quick`` runs only 5000x5000 and 10000x5000.
Timings are single runs; the load average is printed before and after, since other processes share the cores.

Families (all rows then scaled alike, so ES is comparable across sizes):

- gaussian: i.i.d. N(0, 1) entries; Marchenko-Pastur spectrum, ill-conditioned at K = d.
- power-law: feature scales j^-1/2, so eigenvalues decay like 1/j, then a random orthogonal mixing of the
  features (random signs + orthonormal DCT) so that no basis vector is an eigenvector.
- outliers: Gaussian with 8 feature dimensions scaled x50, like the massive activations of LLM residual streams.
- rank-deficient: rank d/8 (Z = G W / sqrt(r)): most eigenvalues are exact zeros beyond those of K > d.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import scipy.fft
import torch

from neurolight.lightning_modules.send.eigenscore import efficient_eigenscore, eigenscore

FAMILIES = ("gaussian", "power-law", "outliers", "rank-deficient")


def make_embeddings(family: str, num_rows: int, d: int, seed: int = 0) -> torch.Tensor:
    """(num_rows, d) float32 matrix of the named family."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_rows, d, generator=generator)
    if family == "gaussian":
        return z
    if family == "power-law":
        z *= torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
        signs = torch.randint(0, 2, (d,), generator=generator).float() * 2 - 1
        mixed = scipy.fft.dct((z * signs).numpy(), type=2, norm="ortho", axis=1, workers=os.cpu_count())
        return torch.from_numpy(np.ascontiguousarray(mixed, dtype=np.float32))
    if family == "outliers":
        z[:, torch.randperm(d, generator=generator)[:8]] *= 50
        return z
    if family == "rank-deficient":
        rank = max(1, d // 8)
        return z[:, :rank] @ torch.randn(rank, d, generator=generator) / math.sqrt(rank)
    raise ValueError(f"family {family!r}; choose from {FAMILIES}")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 5000x5000 and 10000x5000")
    parser.add_argument("--sizes", default="5000x5000,10000x5000,20000x5000", help="comma-separated KxD")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--method", default="auto", help="efficient_eigenscore method: auto, slq, kpm")
    parser.add_argument("--seed", type=int, default=0, help="seed of the matrices and of the probes")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    if args.quick:
        sizes = [size for size in sizes if size[0] <= 10000]
    print(f"load average before: {os.getloadavg()}  threads: {torch.get_num_threads()}  method: {args.method}")
    header = f"{'K x d':>12} {'family':>15} {'ES':>9} {'exact s':>8} {'EES s':>7} {'speed-up':>8} {'rel err':>8}"
    print(header + f" {'est. SE':>8}  path")
    worst, total = 0.0, time.perf_counter()
    for num_rows, d in sizes:
        for family in args.families.split(","):
            z = make_embeddings(family, num_rows, d, args.seed)
            exact, exact_s = timed(lambda z=z: eigenscore(z).item())
            est, est_s = timed(
                lambda z=z: efficient_eigenscore(z, seed=args.seed, method=args.method, return_info=True)
            )
            rel_err = (est.score.item() - exact) / abs(exact)
            worst = max(worst, abs(rel_err))
            path = f"{est.method}/{est.reason}"
            if est.method == "slq":
                shallow = est.num_probes - min(est.num_probes, 16)
                path += f" (16x{est.num_steps}" + (f" + {shallow}x{est.shallow_steps}" if shallow else "") + ")"
                path += f", {est.deflated} deflated" if est.deflated else ""
            elif est.num_probes:
                path += f" ({est.num_probes}x{est.num_steps})"
            print(
                f"{num_rows:>6}x{d:<5} {family:>15} {exact:>9.4f} {exact_s:>8.2f} {est_s:>7.2f} "
                f"{exact_s / est_s:>7.2f}x {100 * rel_err:>+7.3f}% {100 * est.std_error / abs(exact):>7.3f}%  {path}",
                flush=True,
            )
            del z
    print(f"worst |relative error|: {100 * worst:.3f}%  total wall time: {time.perf_counter() - total:.0f} s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
