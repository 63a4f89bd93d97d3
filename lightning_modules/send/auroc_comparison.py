"""Two detection methods compared on the same answers: the difference of their AUROCs with DeLong's test for
correlated ROC curves (DeLong, DeLong & Clarke-Pearson 1988, section 3), as pROC's ``roc.test`` does by default.
docs/send.md, Comparing two methods.

Both AUROCs come from the same hallucinated and correct answers, so their errors are correlated; the variance of the
difference takes the covariance of the two methods' structural components (``auroc_interval``):
``var(A - B) = (S10_AA + S10_BB - 2 S10_AB) / m + (S01_AA + S01_BB - 2 S01_AB) / n``.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from neurolight.lightning_modules.send.auroc_interval import delong_variance, pairwise_wins


class Comparison(NamedTuple):
    """Method A against method B on the same answers."""

    difference: float
    """AUROC of A minus AUROC of B."""
    low: float | None
    """Lower end of the difference's ``level`` interval (None where the difference has no spread)."""
    high: float | None
    """Upper end."""
    p_value: float | None
    """Two-sided p of DeLong's test that the two AUROCs are equal (None where the difference has no spread)."""


def compare_paired(
    scores_a: np.ndarray, scores_b: np.ndarray, hallucinated: np.ndarray, level: float = 0.95
) -> Comparison:
    """DeLong's test of AUROC(A) = AUROC(B), both scores oriented so that higher = more likely hallucinated, on the
    same answers (``hallucinated``: the labels)."""
    positive = np.asarray(hallucinated, dtype=bool)
    wins_a = pairwise_wins(np.asarray(scores_a, dtype=np.float64), positive)
    wins_b = pairwise_wins(np.asarray(scores_b, dtype=np.float64), positive)
    difference = float(wins_a.mean() - wins_b.mean())
    # The structural components of W_A - W_B are the per-answer differences of the two methods' components, whose
    # variance over each class is S_AA + S_BB - 2 S_AB: DeLong's variance of that matrix (0 for a class of one).
    variance = delong_variance(wins_a - wins_b)
    if not variance > 0:
        return Comparison(difference, None, None, None)
    se = math.sqrt(variance)
    half = NormalDist().inv_cdf((1 + level) / 2) * se
    p_value = 2 * (1 - NormalDist().cdf(abs(difference) / se))
    return Comparison(difference, difference - half, difference + half, p_value)
