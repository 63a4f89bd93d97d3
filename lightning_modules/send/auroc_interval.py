"""Confidence intervals of an AUROC (hallucinated = positive), one function per method in ``INTERVALS``:
docs/send.md, Evaluating hallucination detection, which gives the coverage each method reached in simulation.

All work from the ``(m, n)`` matrix ``W`` of pairwise wins (1 where hallucinated answer i outscores correct answer
j, 1/2 for a tie, 0 otherwise), whose mean is the AUROC. Its row means ``V10`` and column means ``V01`` are
DeLong's structural components, and ``V10 - AUROC``, ``V01 - AUROC`` the empirical influence values of the
hallucinated and the correct answers (the Mann-Whitney statistic's Hoeffding decomposition).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

_NORMAL = NormalDist()


def pairwise_wins(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """(m, n) float64: 1 where positive i outscores negative j, 1/2 for a tie, 0 otherwise."""
    if positive.all() or not positive.any():
        raise ValueError(f"AUROC needs both classes; all {len(positive)} labels are {bool(positive[0])}")
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return (pos > neg) + 0.5 * (pos == neg)


def _resampled_aurocs(wins: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
    """AUROCs of stratified bootstrap resamples (each class resampled with replacement, keeping both counts, as
    pROC's ``ci.auc`` does). A resample with multiplicity vectors ``c_p``, ``c_n`` has AUROC
    ``c_p^T W c_n / (m n)``: exact, with no re-sorting, one matrix product for all."""
    m, n = wins.shape
    rng = np.random.default_rng(seed)
    counts_p = rng.multinomial(m, np.full(m, 1 / m), size=num_resamples).astype(np.float64)
    counts_n = rng.multinomial(n, np.full(n, 1 / n), size=num_resamples).astype(np.float64)
    return ((counts_p @ wins) * counts_n).sum(1) / (m * n)


def _influence(wins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    auroc = wins.mean()
    return wins.mean(1) - auroc, wins.mean(0) - auroc


def percentile_bootstrap(wins: np.ndarray, level: float, num_resamples: int, seed: int) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled AUROCs (Efron & Tibshirani 1993,
    chapter 13). Runs narrow when the AUROC is high and the classes small."""
    tail = (1 - level) / 2
    low, high = np.quantile(_resampled_aurocs(wins, num_resamples, seed), [tail, 1 - tail])
    return float(low), float(high)


def bca_bootstrap(wins: np.ndarray, level: float, num_resamples: int, seed: int) -> tuple[float, float]:
    """Bias-corrected and accelerated percentile interval (Efron 1987; Efron & Tibshirani 1993, chapter 14): the
    quantiles are moved by the bias ``z0`` (the share of resamples below the AUROC) and the acceleration ``a``,
    here from the two classes' influence values (Davison & Hinkley 1997, section 3.2, stratified data):
    ``a = (sum L^3 / m^3 + sum M^3 / n^3) / (6 (sum L^2 / m^2 + sum M^2 / n^2)^(3/2))``."""
    values = _resampled_aurocs(wins, num_resamples, seed)
    auroc = wins.mean()
    below = (np.count_nonzero(values < auroc) + 0.5 * np.count_nonzero(values == auroc)) / num_resamples
    half = 0.5 / num_resamples  # a share of 0 or 1 would put z0 at infinity
    z0 = _NORMAL.inv_cdf(min(max(below, half), 1 - half))
    (m, n), (lp, ln) = wins.shape, _influence(wins)
    spread = lp @ lp / m**2 + ln @ ln / n**2
    a = (np.sum(lp**3) / m**3 + np.sum(ln**3) / n**3) / (6 * spread**1.5) if spread > 0 else 0.0
    shares = []
    for z in (_NORMAL.inv_cdf((1 - level) / 2), _NORMAL.inv_cdf((1 + level) / 2)):
        shares.append(_NORMAL.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))))
    low, high = np.quantile(values, shares)
    return float(low), float(high)


def delong_variance(wins: np.ndarray) -> float:
    """DeLong, DeLong & Clarke-Pearson (1988): ``var(V10) / m + var(V01) / n``, each variance over m - 1 (n - 1)."""
    (m, n), (lp, ln) = wins.shape, _influence(wins)
    return float(lp @ lp / (m * (m - 1)) + ln @ ln / (n * (n - 1))) if m > 1 and n > 1 else 0.0


def delong(wins: np.ndarray, level: float, num_resamples: int, seed: int) -> tuple[float, float]:
    """AUROC +- z SE with DeLong's variance, clipped to [0, 1] (pROC's default): symmetric, so it runs narrow
    near 1, where the AUROC's distribution is skewed."""
    auroc, half = wins.mean(), _NORMAL.inv_cdf((1 + level) / 2) * math.sqrt(delong_variance(wins))
    return float(max(0.0, auroc - half)), float(min(1.0, auroc + half))


def logit_delong(wins: np.ndarray, level: float, num_resamples: int, seed: int) -> tuple[float, float]:
    """DeLong's interval on the logit scale, mapped back (Pepe 2003, section 5.2.2; Qin & Hotilovac 2008): the
    delta method gives SE(logit AUROC) = SE / (AUROC (1 - AUROC)); the interval stays inside (0, 1) and is
    asymmetric near the bounds. A point where the AUROC is 0 or 1."""
    auroc = float(wins.mean())
    if auroc in (0.0, 1.0):
        return auroc, auroc
    half = _NORMAL.inv_cdf((1 + level) / 2) * math.sqrt(delong_variance(wins)) / (auroc * (1 - auroc))
    center = math.log(auroc / (1 - auroc))
    return 1 / (1 + math.exp(half - center)), 1 / (1 + math.exp(-half - center))


class IntervalMethod(NamedTuple):
    """One way to compute an AUROC's confidence interval."""

    title: str
    """Name in table captions."""
    compute: Callable[[np.ndarray, float, int, int], tuple[float, float]]
    """``f(wins, level, num_resamples, seed) -> (low, high)``."""
    resampled: bool
    """Whether it bootstraps (and so uses ``num_resamples`` and ``seed``)."""


INTERVALS: dict[str, IntervalMethod] = {
    "logit_delong": IntervalMethod("DeLong, logit scale", logit_delong, resampled=False),
    "bca": IntervalMethod("BCa bootstrap", bca_bootstrap, resampled=True),
    "percentile": IntervalMethod("percentile bootstrap", percentile_bootstrap, resampled=True),
    "delong": IntervalMethod("DeLong", delong, resampled=False),
}
"""Interval method name -> method."""
