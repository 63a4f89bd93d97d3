"""Hallucination and QA metrics: EigenScore (exact and efficient, from ``lightning_modules/send/eigenscore/``) as
functions and torchmetrics ``Metric``s for logging, SQuAD exact match and token F1, TruthfulQA closer-to-correct,
AUROC. Lightning is not needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional import auroc as _tm_auroc
from torchmetrics.functional.text import squad as _tm_squad

from neurolight.lightning_modules.send.eigenscore import (
    EigenScoreEstimate,
    chebyshev_polynomials,
    efficient_eigenscore,
    eigenscore,
    jackson_damping,
    seeded_generator,
    spectral_upper_bound,
)

__all__ = [
    "EfficientEigenScore",
    "EigenScore",
    "EigenScoreEstimate",
    "auroc",
    "chebyshev_polynomials",
    "efficient_eigenscore",
    "eigenscore",
    "exact_match",
    "jackson_damping",
    "spectral_upper_bound",
    "token_f1",
    "truthfulqa_closer_to_correct",
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


def truthfulqa_closer_to_correct(
    prediction: str, correct_answers: Sequence[str], incorrect_answers: Sequence[str]
) -> bool:
    """True if the answer's best token F1 against the correct references exceeds its best token F1 against the
    incorrect ones (a tie is False). Token F1 is the similarity: the lexical stand-in for TruthfulQA's BLEU/ROUGE
    "max over correct minus max over incorrect" comparison. No incorrect references count as similarity 0."""
    best_incorrect = token_f1(prediction, incorrect_answers) if len(incorrect_answers) else 0.0
    return token_f1(prediction, correct_answers) > best_incorrect


def auroc(scores: Tensor | Sequence[float], labels: Tensor | Sequence[bool]) -> float:
    """Binary AUROC of ``scores`` for ``labels`` (True = positive), e.g. EigenScore against hallucination
    ``token_f1 < 0.5``. Scores are min-max scaled first: torchmetrics would pass scores outside [0, 1] through a
    sigmoid, which ties large scores in float32."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten().long()
    if labels.unique().numel() != 2:
        raise ValueError(f"AUROC needs both classes among the labels; got only {labels.unique().tolist()}")
    spread = scores.max() - scores.min()
    scaled = (scores - scores.min()) / spread if spread > 0 else torch.zeros_like(scores)
    return _tm_auroc(scaled, labels, task="binary").item()
