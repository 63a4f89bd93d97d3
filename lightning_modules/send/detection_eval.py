"""Hallucination detection evaluated as INSIDE does (Chen et al., ICLR 2024, section 4.1 and Table 1): per detection
method and per correctness label, the AUROC of the method's score for telling hallucinated answers from correct
ones, with a confidence interval (``auroc_interval.INTERVALS``) and the class counts, and the Pearson correlation of
the score with the continuous correctness score. Plain numpy; docs/send.md, Evaluating hallucination detection.

Every method's score is oriented so that HIGHER means MORE LIKELY HALLUCINATED (``Method.sign``), and the
positive class of every AUROC is "hallucinated".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from neurolight.lightning_modules.send.auroc_comparison import compare_paired
from neurolight.lightning_modules.send.auroc_interval import INTERVALS, pairwise_wins


class Method(NamedTuple):
    """A per-question hallucination score stored in each answer of a predictions file."""

    title: str
    """Name in tables and plots."""
    sign: float
    """+1 when a higher stored value means more likely hallucinated, -1 when it means less likely."""
    legacy_fields: tuple[str, ...] = ()
    """Names the field had in files written by earlier versions."""


METHODS: dict[str, Method] = {
    "answer_eigenscore": Method("EigenScore", 1.0, ("eigenscore",)),
    "answer_ees": Method("efficient EigenScore", 1.0),
    "perplexity": Method("perplexity", 1.0),
    "ln_entropy": Method("LN-entropy", 1.0),
    "lexical_similarity": Method("lexical similarity", -1.0),
    "energy": Method("energy", 1.0),
}
"""Answer field -> method; docs/send.md, Baselines, defines each."""


class Label(NamedTuple):
    """A correctness label: a continuous per-answer score and the rule that makes it correct / hallucinated."""

    title: str
    """Name in tables and plots."""
    score_field: str
    """The answer field with the continuous correctness score (higher = more correct), for the Pearson r."""
    threshold_setting: str | None
    """The setting that holds the threshold (``score >= threshold`` is correct); None: a fixed rule."""


LABELS: dict[str, Label] = {
    "f1": Label("F1", "f1", "hallucination_f1"),
    "exact_match": Label("exact match", "exact_match", None),
    "rouge_l": Label("ROUGE-L", "rouge_l", "hallucination_rouge_l"),
    "truthfulqa": Label("TruthfulQA closer-to-correct", "truthfulqa_margin", None),
    "judge": Label("judge", "judge_p_yes", None),
}
"""Label name -> label; the flags are each answer's ``hallucinated[name]`` (docs/send.md, Correctness labels)."""


def auroc(scores: Sequence[float], hallucinated: Sequence[bool]) -> float:
    """P(score of a hallucinated answer > score of a correct one), ties counting 1/2 (Mann-Whitney U / (m n)):
    the area under the ROC curve with hallucinated as the positive class. Needs both classes."""
    wins = pairwise_wins(np.asarray(scores, dtype=np.float64), np.asarray(hallucinated, dtype=bool))
    return float(wins.mean())


def auroc_interval(
    scores: Sequence[float],
    hallucinated: Sequence[bool],
    method: str = "logit_delong",
    level: float = 0.95,
    num_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """The ``level`` confidence interval of the AUROC by ``method``, a key of ``auroc_interval.INTERVALS``
    (``num_resamples`` and ``seed`` serve the bootstrap methods). A point where the classes are perfectly
    separated (AUROC 0 or 1): no method can vary there."""
    if method not in INTERVALS:
        raise ValueError(f"unknown interval method {method!r}; choose one of {', '.join(INTERVALS)}")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie strictly between 0 and 1 (0.95 = a 95% interval)")
    if num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples} must be at least 1")
    wins = pairwise_wins(np.asarray(scores, dtype=np.float64), np.asarray(hallucinated, dtype=bool))
    return INTERVALS[method].compute(wins, level, num_resamples, seed)


def roc_curve(scores: Sequence[float], hallucinated: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates (each (thresholds + 1,), from (0, 0) to (1, 1)) as the threshold falls
    through the distinct scores; tied scores move both rates at once, so the curve's area is ``auroc``."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(hallucinated, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]
    tp, fp = np.cumsum(positive)[last_of_tie], np.cumsum(~positive)[last_of_tie]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None where either side is constant (or fewer than 2 points)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


class Settings(NamedTuple):
    """How the detection table is computed."""

    min_class_size: int = 10
    """Fewest hallucinated and fewest correct answers a label needs before an AUROC is reported."""
    num_resamples: int = 1000
    """Bootstrap resamples of the confidence interval (bootstrap methods)."""
    level: float = 0.95
    """Confidence level of the interval."""
    seed: int = 0
    """Seed of the bootstrap."""
    interval: str = "logit_delong"
    """How the interval is computed: a key of ``auroc_interval.INTERVALS``; the default and ``bca`` covered the
    true AUROC best in simulation (docs/send.md, Evaluating hallucination detection)."""


def method_scores(row: Mapping, method: str) -> float | None:
    """The stored value of ``method`` in one answer (under its current or a legacy name), or None."""
    for field in (method, *METHODS[method].legacy_fields):
        value = row.get(field)
        if value is not None:
            return float(value)
    return None


def labelled_answers(rows: Sequence[Mapping], methods: Sequence[str], label: str) -> list[Mapping]:
    """The answers that have the score of every one of ``methods`` and a flag under ``label``."""
    return [
        row
        for row in rows
        if all(method_scores(row, method) is not None for method in methods)
        and label in (row.get("hallucinated") or {})
    ]


def oriented_scores(rows: Sequence[Mapping], method: str) -> list[float]:
    """``method``'s score of each of ``rows``, oriented so that higher = more likely hallucinated (``Method.sign``)."""
    return [METHODS[method].sign * method_scores(row, method) for row in rows]


def class_counts(rows: Sequence[Mapping], label: str) -> dict[str, int]:
    """Answers with a flag under ``label``: how many are hallucinated and how many correct."""
    flags = [row["hallucinated"][label] for row in rows if label in (row.get("hallucinated") or {})]
    return {"hallucinated": int(sum(flags)), "correct": len(flags) - int(sum(flags))}


def shortfall(counts: Mapping[str, int], min_class_size: int) -> str | None:
    """Why an AUROC would not be supported by these class counts, or None when both classes are large enough."""
    for name in ("correct", "hallucinated"):
        if counts[name] < min_class_size:
            return f"not enough {name} answers (n = {counts[name]}, fewer than {min_class_size})"
    return None


SEPARATED = "perfect separation: no interval (every resample and every variance estimate is a point)"
"""The note of a cell whose AUROC is 0 or 1: an interval there would be a point that cannot cover the truth."""
NO_SPREAD = "no interval: the scores do not vary enough (a constant score, or a class of one answer)"
"""The note of a cell whose interval came out as a point otherwise (zero variance, every resample the same)."""


def interval_text(cell: Mapping) -> str:
    """A cell's interval for a table or a legend: ``[0.55, 0.83]``, or why there is none (``[separated]``,
    ``[no spread]``)."""
    if cell["ci_low"] is None:
        return "[separated]" if cell["note"] == SEPARATED else "[no spread]"
    return f"[{cell['ci_low']:.2f}, {cell['ci_high']:.2f}]"


def evaluate(rows: Sequence[Mapping], method: str, label: str, settings: Settings | None = None) -> dict:
    """One cell of the table: ``auroc``, ``ci_low``, ``ci_high`` (all None with a ``note`` where a class has fewer
    than ``min_class_size`` answers; the interval None with the note ``SEPARATED`` where the AUROC is 0 or 1, or
    ``NO_SPREAD`` where the interval would be a point otherwise),
    ``pearson`` (of minus the oriented score, a confidence, with the label's continuous correctness score: a useful
    detector has a positive r, as in INSIDE's Table 1), and the class counts over the answers that have both the
    method's score and the label (``settings``: default ``Settings()``)."""
    settings = settings or Settings()
    score_field = LABELS[label].score_field
    usable = labelled_answers(rows, [method], label)
    counts = class_counts(usable, label)
    cell: dict = {"n_hallucinated": counts["hallucinated"], "n_correct": counts["correct"]}
    cell |= {"auroc": None, "ci_low": None, "ci_high": None, "pearson": None, "note": None}
    if not usable:
        cell["note"] = "no answers with this score and label"
        return cell
    scores = oriented_scores(usable, method)
    continuous = [row.get(score_field) for row in usable]
    if all(value is not None for value in continuous):
        cell["pearson"] = pearson([-score for score in scores], [float(value) for value in continuous])
    cell["note"] = shortfall(counts, settings.min_class_size)
    if cell["note"] is None:
        flags = [row["hallucinated"][label] for row in usable]
        cell["auroc"] = auroc(scores, flags)
        if cell["auroc"] in (0.0, 1.0):
            cell["note"] = SEPARATED
        else:
            low, high = auroc_interval(
                scores, flags, settings.interval, settings.level, settings.num_resamples, settings.seed
            )
            if low < high:
                cell["ci_low"], cell["ci_high"] = low, high
            else:
                cell["note"] = NO_SPREAD
    return cell


BASELINES = ("perplexity", "ln_entropy", "lexical_similarity", "energy")
"""The methods EigenScore is compared against (INSIDE's baselines and the energy score)."""


def compare(rows: Sequence[Mapping], method: str, baseline: str, label: str, settings: Settings | None = None) -> dict:
    """``method`` against ``baseline`` under ``label``, on the answers that have both scores and the label:
    ``difference`` (AUROC of method minus baseline's), its ``ci_low`` / ``ci_high`` and the two-sided ``p_value``
    of DeLong's paired test (``auroc_comparison``), and the class counts; None with a ``note`` where a class has
    fewer than ``min_class_size`` answers, or the difference has no spread."""
    settings = settings or Settings()
    usable = labelled_answers(rows, [method, baseline], label)
    counts = class_counts(usable, label)
    cell: dict = {"n_hallucinated": counts["hallucinated"], "n_correct": counts["correct"]}
    cell |= {"difference": None, "ci_low": None, "ci_high": None, "p_value": None}
    cell["note"] = shortfall(counts, settings.min_class_size) if usable else "no answers with both scores and label"
    if cell["note"] is None:
        scores = [np.array(oriented_scores(usable, m)) for m in (method, baseline)]
        flags = np.array([row["hallucinated"][label] for row in usable])
        result = compare_paired(*scores, flags, settings.level)
        cell.update(result._asdict())
        cell["ci_low"], cell["ci_high"] = cell.pop("low"), cell.pop("high")
        if result.p_value is None:
            cell["note"] = "no spread: the two methods rank the answers alike"
    return cell


def detection_table(rows: Sequence[Mapping], settings: Settings | None = None) -> dict[str, dict[str, dict]]:
    """``evaluate`` for every method some answer has, under every label some answer has: {method: {label: cell}}."""
    settings = settings or Settings()
    methods = [m for m in METHODS if any(method_scores(row, m) is not None for row in rows)]
    labels = [name for name in LABELS if any(name in (row.get("hallucinated") or {}) for row in rows)]
    return {method: {label: evaluate(rows, method, label, settings) for label in labels} for method in methods}
