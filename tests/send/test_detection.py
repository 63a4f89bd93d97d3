"""Hallucination detection as INSIDE evaluates it: AUROC against scikit-learn, the confidence intervals against
SciPy's bootstrap, DeLong's definition and their coverage on simulated data, ROUGE-L against the rouge-score package
and an independent LCS, the baselines against hand computations from known logits, the class counts and the refusal
of too-small classes, the aggregate of a predictions file and the judge's P(Yes) on a tiny model with known logits."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from neurolight.callbacks.send.qa_prediction_writer import Thresholds, aggregate, score_answer
from neurolight.lightning_modules.send.auroc_comparison import compare_paired
from neurolight.lightning_modules.send.auroc_interval import INTERVALS, delong_variance, pairwise_wins
from neurolight.lightning_modules.send.detection_eval import (
    NO_SPREAD,
    SEPARATED,
    Settings,
    auroc,
    auroc_interval,
    compare,
    evaluate,
    pearson,
    roc_curve,
)
from neurolight.lightning_modules.send.detection_scores import (
    lexical_similarity,
    ln_entropy,
    perplexity,
    scored_lengths,
    step_scores,
    token_statistics,
)
from neurolight.lightning_modules.send.qa_metrics import rouge_l

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ AUROC
@pytest.mark.parametrize("seed", range(4))
def test_auroc__equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.3
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: many ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, labels), abs=1e-12)


def test_auroc__needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [True, True])


def _coverage(method: str, size: int, true_auroc: float, trials: int) -> float:
    """Share of ``trials`` data sets (``size`` hallucinated ~ N(delta, 1), ``size`` correct ~ N(0, 1)) whose
    interval covers the true AUROC Phi(delta / sqrt 2); a perfectly separated data set (no interval) is redrawn."""
    delta = math.sqrt(2) * NormalDist().inv_cdf(true_auroc)
    rng, covered, labels = np.random.default_rng(0), 0, np.r_[np.ones(size, bool), np.zeros(size, bool)]
    for trial in range(trials):
        scores = np.r_[rng.normal(delta, 1, size), rng.normal(0, 1, size)]
        while auroc(scores, labels) == 1.0:
            scores = np.r_[rng.normal(delta, 1, size), rng.normal(0, 1, size)]
        low, high = auroc_interval(scores, labels, method, num_resamples=500, seed=trial)
        assert low <= auroc(scores, labels) <= high
        covered += low <= true_auroc <= high
    return covered / trials


@pytest.mark.parametrize("method", list(INTERVALS))
def test_intervals__cover_a_moderate_auroc_at_the_nominal_rate(method):
    # 40 + 40 answers, true AUROC 0.760: every method is near 95% (300 trials: a standard error of 1.3 points).
    assert 0.91 <= _coverage(method, 40, 0.5 * (1 + math.erf(0.5)), 300) <= 0.98


def test_intervals__the_default_covers_a_high_auroc_with_small_classes_where_the_symmetric_ones_fall_short():
    # 20 + 20 answers, true AUROC 0.90 (bench/auroc_interval_coverage.py, 1000 data sets: logit DeLong 0.956,
    # BCa 0.959, percentile 0.929, DeLong 0.903).
    coverage = {method: _coverage(method, 20, 0.9, 300) for method in INTERVALS}
    assert Settings().interval == "logit_delong"
    assert coverage["logit_delong"] >= 0.94 and coverage["bca"] >= 0.92  # here 0.950 and 0.930
    assert coverage["delong"] < coverage["percentile"] < min(coverage["logit_delong"], coverage["bca"]) - 0.05


def _auroc_statistic(hallucinated, correct, axis=-1):
    """AUROC for SciPy's vectorized bootstrap: the last axis holds each class's answers."""
    h, c = np.moveaxis(hallucinated, axis, -1)[..., :, None], np.moveaxis(correct, axis, -1)[..., None, :]
    return ((h > c) + 0.5 * (h == c)).mean(axis=(-2, -1))


@pytest.mark.parametrize(("method", "scipy_method"), [("bca", "BCa"), ("percentile", "percentile")])
def test_bootstrap_intervals__match_scipy_bootstrap_of_the_two_classes(method, scipy_method):
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    hallucinated, correct = rng.normal(1.2, 1, 12), rng.normal(0, 1, 17)  # true AUROC 0.80; sample AUROC below
    scores, labels = np.r_[hallucinated, correct], np.r_[np.ones(12, bool), np.zeros(17, bool)]
    ours = auroc_interval(scores, labels, method, num_resamples=40_000, seed=0)
    # SciPy resamples each sample independently (stratified) and takes BCa's acceleration from the jackknife,
    # whose values for the AUROC are exactly the influence values auroc_interval uses.
    theirs = scipy_stats.bootstrap(
        (hallucinated, correct), _auroc_statistic, n_resamples=40_000, method=scipy_method, random_state=1
    ).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.006)  # Monte Carlo error of 40k resamples


def test_delong_variance__equals_its_definition_and_the_sampling_variance():
    rng = np.random.default_rng(0)
    h, c = rng.normal(1, 1, 7), rng.normal(0, 1, 9)
    wins = pairwise_wins(np.r_[h, c], np.r_[np.ones(7, bool), np.zeros(9, bool)])
    # DeLong et al. (1988): V10(x) = mean over correct y of psi(x, y), V01(y) = mean over hallucinated x.
    psi = [[1.0 if x > y else 0.5 if x == y else 0.0 for y in c] for x in h]
    theta = sum(map(sum, psi)) / 63
    v10, v01 = [sum(row) / 9 for row in psi], [sum(psi[i][j] for i in range(7)) / 7 for j in range(9)]
    s10 = sum((v - theta) ** 2 for v in v10) / 6
    s01 = sum((v - theta) ** 2 for v in v01) / 8
    assert delong_variance(wins) == pytest.approx(s10 / 7 + s01 / 9, rel=1e-12)
    # Over 3000 data sets of 30 + 30 its mean is the AUROC's sampling variance (to Monte Carlo error).
    labels = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    sets = [np.r_[rng.normal(1, 1, 30), rng.normal(0, 1, 30)] for _ in range(3000)]
    values = [auroc(s, labels) for s in sets]
    estimates = [delong_variance(pairwise_wins(s, labels)) for s in sets]
    assert np.mean(estimates) == pytest.approx(np.var(values, ddof=1), rel=0.08)


def test_logit_delong__is_delong_mapped_through_the_logit():
    scores, labels = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2, 0.8, 0.35], [0, 1, 0, 1, 1, 0, 0, 1]
    theta = auroc(scores, labels)
    se = math.sqrt(delong_variance(pairwise_wins(np.asarray(scores, float), np.asarray(labels, bool))))
    low, high = auroc_interval(scores, labels, "logit_delong", level=0.9)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    half = NormalDist().inv_cdf(0.95) * se / (theta * (1 - theta))
    assert (logit(low), logit(high)) == pytest.approx((logit(theta) - half, logit(theta) + half), rel=1e-12)
    assert 0 < low < theta < high < 1


def test_interval__is_reproducible_with_its_seed_and_rejects_an_unknown_method():
    scores, labels = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2], [0, 1, 0, 1, 1, 0]
    assert auroc_interval(scores, labels, "bca", seed=3) == auroc_interval(scores, labels, "bca", seed=3)
    with pytest.raises(ValueError, match="unknown interval method 'wald'; choose one of logit_delong, bca"):
        auroc_interval(scores, labels, "wald")


def test_evaluate__perfect_separation_gives_the_auroc_without_an_interval():
    rows = [{"perplexity": float(i), "hallucinated": {"f1": i >= 10}, "f1": float(i < 10)} for i in range(20)]
    cell = evaluate(rows, "perplexity", "f1")
    assert cell["auroc"] == 1.0 and cell["ci_low"] is None and cell["ci_high"] is None
    assert cell["note"] == SEPARATED


def test_evaluate__a_constant_score_or_a_class_of_one_gives_no_interval():
    constant = [{"perplexity": 2.0, "hallucinated": {"f1": i >= 10}, "f1": float(i < 10)} for i in range(20)]
    cell = evaluate(constant, "perplexity", "f1")
    assert cell["auroc"] == 0.5 and cell["ci_low"] is None and cell["note"] == NO_SPREAD
    one = [{"perplexity": float(i % 7), "hallucinated": {"f1": i == 3}, "f1": float(i != 3)} for i in range(12)]
    for method in INTERVALS:
        cell = evaluate(one, "perplexity", "f1", Settings(min_class_size=1, interval=method, num_resamples=200))
        assert 0 < cell["auroc"] < 1, method
        assert (cell["ci_low"] is None) == (cell["note"] == NO_SPREAD), method
        assert cell["ci_low"] is None or cell["ci_low"] < cell["ci_high"], method


def test_pearson__equals_numpy_and_is_none_for_a_constant():
    x, y = [1.0, 2.0, 4.0, 3.0], [0.5, 0.1, 0.9, 0.4]
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert pearson(x, [1.0] * 4) is None


# ---------------------------------------------------------------------------------------------- ROUGE-L
ROUGE_CASES = [
    ("The cat sat on the mat", "a cat was sitting on the mat"),
    ("Paris, France.", "paris"),
    ("It was 1969 -- in July!", "July 1969"),
    ("no overlap here", "something else"),
    ("the the the", "the cat the"),
    ("", "anything"),
]


@pytest.mark.parametrize(("prediction", "reference"), ROUGE_CASES)
def test_rouge_l__equals_the_rouge_score_package(prediction, reference):
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_rouge_l__best_reference_and_letters_of_any_script_by_an_independent_lcs():
    def lcs(a, b):  # the textbook table, independently of the implementation's rolling rows
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    prediction, references = "Ünïcode wörds stay, wörds", ["wörds ünïcode", "stay"]
    a, b = ["ünïcode", "wörds", "stay", "wörds"], ["wörds", "ünïcode"]
    f = 2 * lcs(a, b) / (len(a) + len(b))  # F = 2 LCS / (|a| + |b|) when P and R are weighted equally
    assert rouge_l(prediction, references) == pytest.approx(max(f, 2 * 1 / (4 + 1)))


# -------------------------------------------------------------------------------------------- baselines
def test_token_statistics__log_probabilities_and_energy_from_known_logits():
    # Two rows, three steps, vocabulary of 3. Row 0 scores 2 tokens, row 1 all 3.
    logits = (
        torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]),
        torch.tensor([[5.0, 5.0, 5.0], [0.0, 0.0, 2.0]]),
    )
    generated = torch.tensor([[0, 2, 1], [1, 0, 2]])
    lengths = scored_lengths(torch.tensor([1, 3]), torch.tensor([True, False]), steps=3)
    assert lengths.tolist() == [2, 3]  # the answer token and its stop token; a row cut at max_new_tokens: all
    per_step = [step_scores(step, generated[:, i], energy_temperature=2.0) for i, step in enumerate(logits)]
    logprob, energy = (torch.stack(values, 1) for values in zip(*per_step))
    stats = token_statistics(logprob, energy, lengths)

    def logp(row, token):
        return row[token] - math.log(sum(math.exp(v) for v in row))

    def energy(row, t=2.0):
        return -t * math.log(sum(math.exp(v / t) for v in row))

    rows = [[[2, 0, 0], [0, 0, 3]], [[0, 1, 0], [1, 1, 1], [0, 0, 2]]]
    tokens = [[0, 2], [1, 0, 2]]
    means = []
    for r in range(2):
        mean_logp = sum(logp(row, t) for row, t in zip(rows[r], tokens[r])) / len(tokens[r])
        mean_energy = sum(energy(row) for row in rows[r]) / len(rows[r])
        assert stats.mean_logprob[r].item() == pytest.approx(mean_logp, rel=1e-6)  # float32 step scores
        assert stats.mean_energy[r].item() == pytest.approx(mean_energy, rel=1e-6)
        means.append(mean_logp)
    assert perplexity(stats.mean_logprob[0].item()) == pytest.approx(math.exp(-means[0]))
    assert ln_entropy([-1.0, -2.0, -0.5]) == pytest.approx(3.5 / 3)


def test_lexical_similarity__mean_rouge_l_over_pairs():
    texts = ["Paris", "paris france", "Lyon"]
    pairs = [rouge_l("Paris", "paris france"), rouge_l("Paris", "Lyon"), rouge_l("paris france", "Lyon")]
    assert pairs == [pytest.approx(2 / 3), 0.0, 0.0]
    assert lexical_similarity(texts) == pytest.approx(sum(pairs) / 3)


# ------------------------------------------------------------------------------- labels and the table
def _rows(f1s, scores):
    return [{"f1": f, "answer_eigenscore": s, "hallucinated": {"f1": f < 0.5}} for f, s in zip(f1s, scores)]


def test_evaluate__refuses_an_auroc_when_a_class_is_too_small():
    f1s = [1.0, 0.9] + [0.0] * 30  # 2 correct answers, 30 hallucinated
    rng = np.random.default_rng(0)
    cell = evaluate(_rows(f1s, rng.normal(size=32)), "answer_eigenscore", "f1", Settings(min_class_size=10))
    assert cell["auroc"] is None and cell["ci_low"] is None
    assert cell["note"].startswith("not enough correct answers (n = 2")
    assert (cell["n_correct"], cell["n_hallucinated"]) == (2, 30)
    allowed = evaluate(_rows(f1s, rng.normal(size=32)), "answer_eigenscore", "f1", Settings(min_class_size=2))
    assert allowed["auroc"] is not None and allowed["ci_low"] <= allowed["auroc"] <= allowed["ci_high"]


def test_evaluate__orients_scores_so_that_higher_means_hallucinated():
    f1s = [0.0] * 10 + [1.0] * 10
    similarity = [0.1] * 10 + [0.9] * 10  # agreeing answers are the correct ones: a perfect detector
    rows = [{"f1": f, "lexical_similarity": s, "hallucinated": {"f1": f < 0.5}} for f, s in zip(f1s, similarity)]
    cell = evaluate(rows, "lexical_similarity", "f1")
    assert cell["auroc"] == 1.0 and cell["pearson"] == pytest.approx(1.0)


def test_score_answer__flags_under_every_label_and_reads_an_earlier_versions_field():
    row = {
        "index": 0,
        "generated_response": "The seeds pass through you",
        "answers": ["Nothing happens", "The seeds pass through your digestive system"],
        "reference_answer": "Nothing happens",
        "correct_answers": ["Nothing happens"],
        "incorrect_answers": ["You grow watermelons"],
        "eigenscore": -2.5,  # a file written before the rename
        "judge_p_yes": 0.7,
    }
    scored = score_answer(row, Thresholds(f1=0.5, rouge_l=0.9))
    assert "index" not in scored and "eigenscore" not in scored and scored["answer_eigenscore"] == -2.5
    assert scored["rouge_l"] == pytest.approx(rouge_l(row["generated_response"], row["answers"]))
    assert scored["hallucinated"] == {
        "f1": scored["f1"] < 0.5,
        "exact_match": True,
        "rouge_l": scored["rouge_l"] < 0.9,
        "truthfulqa": True,  # no token in common with the only correct reference: margin 0, a tie
        "judge": False,
    }
    assert score_answer(scored, Thresholds(f1=0.5, rouge_l=0.9)) == scored  # idempotent


def test_aggregate__class_counts_and_a_cell_per_method_and_label():
    rng = np.random.default_rng(1)
    answers = ["paris", "lyon"] * 15
    rows = [
        score_answer(
            {
                "generated_response": a,
                "answers": ["Paris"],
                "reference_answer": "Paris",
                "answer_eigenscore": float(rng.normal(a == "lyon")),
                "perplexity": float(rng.uniform(1, 5)),
            }
        )
        for a in answers
    ]
    summary = aggregate(rows, settings=Settings(min_class_size=10, num_resamples=200))
    assert summary["labels"]["f1"] == {"rule": "token F1 < 0.5", "hallucinated": 15, "correct": 15}
    assert set(summary["detection"]) == {"answer_eigenscore", "perplexity"}
    assert set(summary["detection"]["perplexity"]) == {"f1", "exact_match", "rouge_l"}
    cell = summary["detection"]["answer_eigenscore"]["f1"]
    scores = [r["answer_eigenscore"] for r in rows]
    assert cell["auroc"] == pytest.approx(roc_auc_score([a == "lyon" for a in answers], scores))
    assert summary["evaluation"]["num_resamples"] == 200


# ------------------------------------------------------------------------------------------------- judge
def test_judge__p_yes_from_known_logits_of_a_tiny_model(tiny_model_dir):
    from neurolight.lightning_modules.send.judge import AnswerJudge, judge_question

    judge = AnswerJudge(str(tiny_model_dir), batch_size=2)
    head = torch.nn.Linear(judge.model.config.hidden_size, judge.model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[judge.yes_id], head.bias[judge.no_id] = 1.5, -0.5  # every other token is ignored
    judge.model.lm_head = head
    p_yes = judge.p_yes(["Q1?", "Q2?", "Q3?"], [["a"], ["b", "c"], ["d"]], ["a", "x", ""])
    expected = 1 / (1 + math.exp(-2.0))  # softmax over (1.5, -0.5)
    assert p_yes.tolist() == pytest.approx([expected] * 3, rel=1e-6)
    question = judge_question("Q2?", ["b", "c"], "x")
    assert "Gold answers: b; c" in question and "Proposed answer: x" in question


# ------------------------------------------------------------------------------------- paired comparison
def _correlated_scores(rng, m: int, n: int, shift_a: float, shift_b: float):
    """Two methods' scores of the same m hallucinated and n correct answers: a shared latent plus each method's own
    noise (correlation 0.5), the hallucinated ones shifted by ``shift_a`` / ``shift_b``."""
    shared = rng.normal(0, 1, m + n)
    shift = np.r_[np.ones(m), np.zeros(n)]
    a = (shared + rng.normal(0, 1, m + n)) / math.sqrt(2) + shift_a * shift
    b = (shared + rng.normal(0, 1, m + n)) / math.sqrt(2) + shift_b * shift
    return a, b, shift.astype(bool)


def test_compare_paired__equals_delongs_covariance_computed_by_hand():
    rng = np.random.default_rng(5)
    a, b, labels = _correlated_scores(rng, 8, 11, 1.0, 0.6)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    def components(s):
        return [sum(psi(s[i], s[j]) for j in neg) / 11 for i in pos], [
            sum(psi(s[i], s[j]) for i in pos) / 8 for j in neg
        ]

    def cov(u, v):
        return sum((x - sum(u) / len(u)) * (y - sum(v) / len(v)) for x, y in zip(u, v)) / (len(u) - 1)

    (a10, a01), (b10, b01) = components(a), components(b)
    variance = (cov(a10, a10) + cov(b10, b10) - 2 * cov(a10, b10)) / 8
    variance += (cov(a01, a01) + cov(b01, b01) - 2 * cov(a01, b01)) / 11
    difference = sum(a10) / 8 - sum(b10) / 8
    result = compare_paired(a, b, labels, level=0.9)
    assert result.difference == pytest.approx(difference, abs=1e-12)
    assert result.p_value == pytest.approx(2 * (1 - NormalDist().cdf(abs(difference) / math.sqrt(variance))))
    half = NormalDist().inv_cdf(0.95) * math.sqrt(variance)
    assert (result.low, result.high) == pytest.approx((difference - half, difference + half))


def test_compare_paired__holds_its_size_under_equal_aurocs_and_finds_a_real_difference():
    rng = np.random.default_rng(0)
    null = [compare_paired(*_correlated_scores(rng, 30, 30, 1.0, 1.0)).p_value for _ in range(400)]
    assert 0.02 <= np.mean(np.array(null) < 0.05) <= 0.09  # nominal 5%; 400 trials: standard error 1.1 points
    found = [compare_paired(*_correlated_scores(rng, 30, 30, 1.6, 0.4)).p_value for _ in range(100)]
    assert np.mean(np.array(found) < 0.05) >= 0.8
    same = _correlated_scores(rng, 12, 12, 1.0, 1.0)
    assert compare_paired(same[0], same[0], same[2]).p_value is None  # a method against itself: no spread


def test_compare__eigenscore_against_a_baseline_on_the_answers_with_both_scores():
    rng = np.random.default_rng(2)
    a, b, labels = _correlated_scores(rng, 15, 20, 1.2, 0.3)
    rows = [{"answer_eigenscore": float(x), "perplexity": float(y), "hallucinated": {"f1": bool(h)}}
            for x, y, h in zip(a, b, labels)]  # fmt: skip
    rows.append({"perplexity": 1.0, "hallucinated": {"f1": True}})  # no EigenScore: left out
    cell = compare(rows, "answer_eigenscore", "perplexity", "f1")
    assert (cell["n_hallucinated"], cell["n_correct"]) == (15, 20)
    assert cell["difference"] == pytest.approx(auroc(a, labels) - auroc(b, labels))
    assert cell["p_value"] == compare_paired(a, b, labels).p_value and cell["note"] is None
    few = compare(rows[:20], "answer_eigenscore", "perplexity", "f1")
    assert few["p_value"] is None and few["note"] == "not enough correct answers (n = 5, fewer than 10)"
