"""Hallucination detection as INSIDE evaluates it: AUROC against scikit-learn, the bootstrap interval's coverage on
simulated data, ROUGE-L against the rouge-score package and an independent LCS, the baselines against hand
computations from known logits, the class counts and the refusal of too-small classes, the aggregate of a
predictions file and the judge's P(Yes) on a tiny model with known logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from neurolight.callbacks.send.qa_prediction_writer import Thresholds, aggregate, score_answer
from neurolight.lightning_modules.send.detection_eval import (
    Settings,
    auroc,
    bootstrap_auroc_interval,
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


def test_bootstrap_interval__covers_the_true_auroc_at_the_nominal_rate():
    # Hallucinated ~ N(1, 1), correct ~ N(0, 1): the true AUROC is Phi(1 / sqrt 2) = 0.7602.
    true_auroc = 0.5 * (1 + math.erf(0.5))
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for trial in range(trials):
        scores = np.r_[rng.normal(1, 1, 40), rng.normal(0, 1, 40)]
        labels = np.r_[np.ones(40, bool), np.zeros(40, bool)]
        low, high = bootstrap_auroc_interval(scores, labels, num_resamples=1000, seed=trial)
        assert low <= auroc(scores, labels) <= high
        covered += low <= true_auroc <= high
    assert 0.91 <= covered / trials <= 0.98  # 95% nominal; 300 trials have a standard error of 1.3 points


def test_bootstrap_interval__is_reproducible_with_its_seed():
    scores, labels = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2], [0, 1, 0, 1, 1, 0]
    assert bootstrap_auroc_interval(scores, labels, seed=3) == bootstrap_auroc_interval(scores, labels, seed=3)


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
