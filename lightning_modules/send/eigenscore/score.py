"""EigenScore, exact and efficient: pure tensor math, importable without Lightning or torchmetrics (the public
names are re-exported by ``neurolight.lightning_modules.send.qa_metrics``, beside the torchmetrics ``Metric``s and QA
scores). The estimators live in ``slq.py`` and ``kpm.py``, the operator they share in ``covariance.py``; this module
chooses among them.

EigenScore (INSIDE, Chen et al., ICLR 2024, section 3.1; docs/send.md, EigenScore) of the (K, d) matrix Z of K
answer embeddings, one per row::

    Sigma = Z J_d Z^T / (d - 1)      (K x K; J_d = I_d - 1 1^T / d centres each embedding over its d features)
    ES    = (1/K) logdet(Sigma + alpha I) = (1/K) sum_i log(lambda_i(Sigma) + alpha)

Sigma is ``np.cov(Z)`` (rows are variables, ddof 1) as in INSIDE's code; the log is natural (INSIDE's code uses
log10: divide by ln 10 to compare). ``eigenscore`` computes it exactly, ``efficient_eigenscore`` estimates the same
quantity without a decomposition of Sigma (docs/send.md, Efficient EigenScore); ``deflation.py`` splits off its
outlier directions first::

    es = eigenscore(z)                                    # z: (K, d)
    est = efficient_eigenscore(z, seed=0, return_info=True)
    est.score, est.method                                 # e.g. tensor(-3.26), "slq"
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from neurolight.lightning_modules.send.eigenscore.covariance import (
    EigenScoreEstimate,
    _check_embeddings,
    _Covariance,
    seeded_generator,
)
from neurolight.lightning_modules.send.eigenscore.kpm import (
    _kpm,
    chebyshev_polynomials,
    jackson_damping,
    spectral_upper_bound,
)
from neurolight.lightning_modules.send.eigenscore.slq import _PILOT_PROBES, _slq

__all__ = [
    "EigenScoreEstimate",
    "chebyshev_polynomials",
    "efficient_eigenscore",
    "eigenscore",
    "jackson_damping",
    "seeded_generator",
    "spectral_upper_bound",
]


EES_METHODS = ("auto", "slq", "kpm", "exact")
"""The ``method`` values of ``efficient_eigenscore``."""


def _lower_gram(a: Tensor, blocks: int = 8) -> Tensor:
    """Lower triangle of a a^T (upper part zero) by row blocks: (blocks + 1) / (2 blocks) of the flops of the full
    product, 9/16 at 8 blocks (torch has no syrk); Cholesky reads only the lower triangle."""
    size = a.shape[0]
    if size < 1024:
        return a @ a.T
    gram = a.new_zeros(size, size)
    edges = [round(i * size / blocks) for i in range(blocks + 1)]
    for start, end in itertools.pairwise(edges):
        gram[start:end, :end] = a[start:end] @ a[:end].T
    return gram


def eigenscore(embeddings: Tensor, alpha: float = 1e-3) -> Tensor:
    """Exact EigenScore of ``embeddings`` (K, d): a 0-dim tensor in the input's floating dtype (at least float32).

    Gram matrix of the smaller side (K x K, or d x d when K > d, which has the same nonzero eigenvalues; lower
    triangle only) and a Cholesky log-determinant; the K - d eigenvalues of Sigma that the d x d side lacks are
    zeros, counted as log(alpha). Cholesky runs in the input precision and is repeated in float64 if it fails.
    Non-finite embeddings (e.g. an fp16 overflow) give NaN.
    """
    z = _check_embeddings(embeddings)
    num_rows, d = z.shape
    centred = z - z.mean(1, keepdim=True)
    gram = _lower_gram(centred if num_rows <= d else centred.T)
    size = gram.shape[0]
    shifted = gram.div_(d - 1)
    shifted.diagonal().add_(alpha)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if info.item() != 0:
        if not torch.isfinite(shifted).all():
            return torch.tensor(math.nan, dtype=z.dtype, device=z.device)
        factor = torch.linalg.cholesky(shifted.double())
    logdet = 2 * factor.diagonal().double().log().sum() + (num_rows - size) * math.log(alpha)
    return (logdet / num_rows).to(z.dtype)


def _slq_may_pay(op: _Covariance) -> bool:
    # The cost model is for CPUs. On an H100 the exact score of 20000 x 5000 takes 18 ms and SLQ 10-45 ms, bound
    # by kernel launches, so accelerators always take the exact path.
    return op.z.device.type == "cpu" and 4 * op.step_cost(_PILOT_PROBES) < 0.5 * op.exact_cost


def efficient_eigenscore(
    embeddings: Tensor,
    alpha: float = 1e-3,
    num_moments: int | None = None,
    num_probes: int | None = None,
    seed: int | torch.Generator | None = None,
    *,
    method: str = "auto",
    rtol: float = 1e-2,
    damping: bool = True,
    return_info: bool = False,
) -> Tensor | EigenScoreEstimate:
    """EigenScore of ``embeddings`` (K, d) without a decomposition and without forming the Gram matrix.

    ``method``:

    - "auto" (default): stochastic Lanczos quadrature where it is cheaper than ``eigenscore``, else ``eigenscore``.
      SLQ measured better than KPM on every matrix family (docs/send.md, Kernel polynomial method). Matrices whose
      smaller side is below ~800 (square) to ~1000 (tall) go exact at once. Otherwise:

      1. Deflation: two steps of subspace iteration on 16 directions; those whose Ritz value stands out (>= 2x the
         subspace's smallest, e.g. the massive-activation dimensions of LLM hidden states) are split off exactly by
         the Schur complement (a k x k log-determinant, k <= 16), so that the quadrature sees only the bulk.
      2. Pilot: 16 probes run Lanczos steps until the quadrature error is within ``0.2 * rtol`` of the score: the
         Gauss / Gauss-Radau midpoint (the estimate) changed that little over the last 8 steps and their rigorous
         half-gap is within 5x that, or the half-gap alone is within it.
      3. Two levels: from the pilot's spreads, the cheapest shallow depth m0 (4-64 steps) and the number of extra
         probes run that deep such that 2.5 standard errors of E[Q_m0] (many shallow probes) + E[Q_L - Q_m0] (the
         deep pilot) fit in the other ``0.8 * rtol``.

      As soon as the cost still to pay is projected to exceed that of the exact score (a flop model fitted to
      2-core timings), the exact score runs instead. On accelerators the exact score is always cheaper
      (milliseconds at the paper's sizes) and runs.
    - "slq": the same estimator, never replaced by the exact score.
    - "kpm": the kernel polynomial method of the SEND paper done right: spectral bound from 20 Lanczos steps
      (capped by the trace), true Chebyshev T_m by the three-term recurrence, Jackson ``damping``,
      ``num_moments`` moments (default 100) from ``num_probes`` (default 32) probes. Fixed cost, no error control:
      measured within 0.5% on Gaussian and power-law spectra (64-500 x 100-1000) but 2-550% off with outlier
      dimensions (0.4-31% without damping, which Jackson's kernel, made for densities, does not help here).
    - "exact": ``eigenscore``.

    Probes are Rademacher vectors on the smaller side, all run at once (block products with Z), with v^T Sigma v
    as a control variate (its mean, the trace, is exact); zero eigenvalues beyond the smaller side, and the null
    vector 1_d of the centring when K > d, are counted exactly as log(alpha). ``num_moments`` / ``num_probes``
    fix the Lanczos steps or Chebyshev moments / the probes instead of choosing them. ``seed`` (int or Generator)
    makes the estimate reproducible. Returns a 0-dim tensor, or with ``return_info`` an ``EigenScoreEstimate``
    that says which path ran.
    """
    z = _check_embeddings(embeddings)
    if method not in EES_METHODS:
        raise ValueError(f"method={method!r}; choose one of {', '.join(map(repr, EES_METHODS))}")
    if num_moments is not None and num_moments < 2:
        raise ValueError(f"num_moments={num_moments}; at least 2 Lanczos steps or Chebyshev moments are needed")
    op = _Covariance(z)
    result = None
    with torch.no_grad():
        if method != "exact" and not math.isfinite(op.trace):  # as eigenscore does, without its cost
            nan = torch.tensor(math.nan, dtype=z.dtype, device=z.device)
            result = EigenScoreEstimate(nan, "exact", "non-finite embeddings", 0, 0, 0.0, 0.0)
        elif method == "kpm":
            result = _kpm(op, alpha, num_moments or 100, num_probes or 32, seeded_generator(seed, z), damping)
        elif method == "slq" or (method == "auto" and _slq_may_pay(op)):
            budget = math.inf if method == "slq" else op.exact_cost
            result = _slq(op, alpha, rtol, seeded_generator(seed, z), num_probes, num_moments, budget)
            reason = "estimate would cost more than exact"
        else:
            reason = "requested" if method == "exact" else "exact is cheaper"
        if result is None:
            result = EigenScoreEstimate(eigenscore(z, alpha), "exact", reason, 0, 0, 0.0, 0.0)
    return result if return_info else result.score
