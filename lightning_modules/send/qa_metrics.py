"""Hallucination and QA metrics: EigenScore (exact and efficient, from ``lightning_modules/send/eigenscore/``) as
functions and torchmetrics ``Metric``s for logging, SQuAD exact match and token F1, ROUGE-L, TruthfulQA
closer-to-correct. Lightning is not needed. AUROC and its interval are in ``detection_eval``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.text import squad as _tm_squad

# The EigenScore math lives in (and is exported from) send.eigenscore; these Metrics only aggregate it.
from neurolight.lightning_modules.send.eigenscore import efficient_eigenscore, eigenscore, seeded_generator

__all__ = [
    "EfficientEigenScore",
    "EigenScore",
    "exact_match",
    "rouge_l",
    "rouge_l_tokens",
    "token_f1",
    "truthfulqa_closer_to_correct",
    "truthfulqa_margin",
]


# ---------------------------------------------------------------------------------------------------------------
# torchmetrics wrappers: one update per question (or a batch of questions), mean score over questions.


class EigenScore(Metric):
    """Mean exact EigenScore over questions. ``update(embeddings)`` takes one question's (K, d) answer embeddings,
    a (B, K, d) batch or a sequence of (K_i, d) tensors; the sum and count reduce by summation across ranks."""

    is_differentiable = False
    higher_is_better = None  # a hallucination score, not a quality: higher means the answers disagree more
    full_state_update = False

    def __init__(self, alpha: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alpha = alpha
        self.add_state("score_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("num_questions", default=torch.tensor(0), dist_reduce_fx="sum")

    def _score(self, embeddings: Tensor) -> Tensor:
        return eigenscore(embeddings, self.alpha)

    def update(self, embeddings: Tensor | Sequence[Tensor]) -> None:
        questions = [embeddings] if isinstance(embeddings, Tensor) and embeddings.ndim == 2 else embeddings
        for question in questions:
            self.score_sum += self._score(question.detach()).to(self.score_sum.dtype)
            self.num_questions += 1

    def compute(self) -> Tensor:
        return self.score_sum / self.num_questions


class EfficientEigenScore(EigenScore):
    """Mean ``efficient_eigenscore`` over questions; keyword arguments go to it (``seed`` seeds one generator
    that successive updates draw from)."""

    def __init__(self, alpha: float = 1e-3, seed: int | None = None, method: str = "auto", **kwargs) -> None:
        estimator_keys = ("num_moments", "num_probes", "rtol", "damping")
        self.estimator_kwargs = {key: kwargs.pop(key) for key in estimator_keys if key in kwargs}
        super().__init__(alpha, **kwargs)
        self.seed, self.method, self._generators = seed, method, {}

    def _score(self, embeddings: Tensor) -> Tensor:
        if embeddings.device not in self._generators:
            self._generators[embeddings.device] = seeded_generator(self.seed, embeddings)
        generator = self._generators[embeddings.device]
        return efficient_eigenscore(embeddings, self.alpha, seed=generator, method=self.method, **self.estimator_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# QA scores (docs/send.md, QA scores). torchmetrics' SQuAD normalises exactly as SQuAD v1.1's script does (lower-case,
# drop punctuation, drop the articles a/an/the, collapse white space) and takes the max over gold answers.


def _squad(prediction: str, answers: str | Sequence[str]) -> dict[str, Tensor]:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError(f"no gold answers for prediction {prediction!r}: pass at least one reference")
    return _tm_squad({"prediction_text": prediction, "id": "0"}, {"answers": {"text": answers}, "id": "0"})


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    return _squad(prediction, answers)["exact_match"].item() / 100


def token_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """Best bag-of-tokens F1 (0-1) of the normalised prediction against the normalised gold answers."""
    return _squad(prediction, answers)["f1"].item() / 100


def truthfulqa_margin(prediction: str, correct_answers: Sequence[str], incorrect_answers: Sequence[str]) -> float:
    """Best token F1 against the correct references minus best token F1 against the incorrect ones, in [-1, 1]:
    TruthfulQA's "max similarity to a true reference minus max similarity to a false one" with token F1 as the
    similarity. No incorrect references count as similarity 0."""
    best_incorrect = token_f1(prediction, incorrect_answers) if len(incorrect_answers) else 0.0
    return token_f1(prediction, correct_answers) - best_incorrect


def truthfulqa_closer_to_correct(
    prediction: str, correct_answers: Sequence[str], incorrect_answers: Sequence[str]
) -> bool:
    """True if ``truthfulqa_margin`` is positive: the answer is closer to a correct reference than to any
    incorrect one (a tie is False)."""
    return truthfulqa_margin(prediction, correct_answers, incorrect_answers) > 0


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L (Lin 2004; docs/send.md, QA scores): the F-measure of the longest common subsequence of tokens.

_NON_ALPHANUMERIC = re.compile(r"[\W_]+")


def rouge_l_tokens(text: str) -> list[str]:
    """Tokens as the ``rouge-score`` package's default tokenizer makes them (lower-case, every run of characters
    other than letters and digits a separator, no stemming), except that letters of any script count: rouge-score
    keeps only a-z and 0-9, which would give every TyDiQA answer in Bengali or Thai a score of 0."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """Best ROUGE-L F-measure (0-1, precision and recall weighted equally) of ``prediction`` against the
    references; 0 where either side has no tokens."""
    references = [references] if isinstance(references, str) else list(references)
    if not references:
        raise ValueError(f"no references for prediction {prediction!r}: pass at least one")
    tokens, best = rouge_l_tokens(prediction), 0.0
    for reference in references:
        other = rouge_l_tokens(reference)
        common = _lcs_length(tokens, other) if tokens and other else 0
        if common:
            precision, recall = common / len(tokens), common / len(other)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
