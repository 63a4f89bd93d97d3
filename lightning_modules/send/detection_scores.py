"""The baselines INSIDE compares EigenScore with (Chen et al., ICLR 2024, section 4.1 and Table 1), per question,
from the scores the decoding loop keeps of each step's logits (``step_scores``) and the answer texts: no extra forward
pass. docs/send.md, Baselines.

- perplexity of the most-likely (greedy) answer: exp(-mean log p(token));
- length-normalised entropy over the K sampled answers (Malinin & Gales 2021): -(1/K) sum_k mean_t log p(z_kt);
- lexical similarity (Lin, Trivedi & Sun 2023): the mean ROUGE-L over the K(K-1)/2 pairs of sampled answers;
- energy of the greedy answer (Liu et al. 2020): the mean over its tokens of -T logsumexp(logits / T).

Log-probabilities are the model's own (temperature 1, no top-k / top-p), whatever the sampling settings were.
Each answer is scored over its tokens up to and including the token that ended it (EOS or the newline), as a
sequence's likelihood includes its end; an answer cut by ``max_new_tokens`` over all its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import NamedTuple

import torch
from torch import Tensor

from neurolight.lightning_modules.send.qa_metrics import rouge_l


class TokenStatistics(NamedTuple):
    """Per answer row, means over its scored tokens; (rows,) float64 tensors."""

    mean_logprob: Tensor
    """Mean log-probability of the answer's tokens under the model (temperature 1)."""
    mean_energy: Tensor
    """Mean energy -T logsumexp(logits / T) of the positions that produced the tokens."""


def scored_lengths(num_tokens: Tensor, stopped: Tensor, steps: int) -> Tensor:
    """(rows,) tokens scored per answer: the answer's tokens and the stop token, or all ``steps`` when none came."""
    return torch.where(stopped.bool(), num_tokens + 1, torch.full_like(num_tokens, steps)).clamp(max=steps)


def step_scores(logits: Tensor, tokens: Tensor, energy_temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probability of ``tokens`` (rows,) under ``logits`` (rows, vocab), and the energy -T logsumexp(logits / T),
    both (rows,) float32 (the logsumexp of float32 logits is exact to ~1e-7 relative)."""
    if energy_temperature <= 0:
        raise ValueError(f"energy_temperature={energy_temperature} must be positive")
    logits = logits.float()
    log_norm = logits.logsumexp(-1)
    logprob = logits.gather(-1, tokens[:, None]).squeeze(-1) - log_norm
    t = energy_temperature
    energy = -log_norm if t == 1 else -t * (logits / t).logsumexp(-1)
    return logprob, energy


def token_statistics(logprob: Tensor, energy: Tensor, lengths: Tensor) -> TokenStatistics:
    """Means over the first ``lengths[r]`` steps of each row of ``logprob`` and ``energy`` (rows, steps), the
    ``step_scores`` of every generated token; ``lengths`` (rows,): tokens scored per row (``scored_lengths``)."""
    if logprob.shape != energy.shape:
        raise ValueError(f"logprob {tuple(logprob.shape)} and energy {tuple(energy.shape)} must have one shape")
    steps = torch.arange(logprob.shape[1], device=logprob.device)
    live = steps[None, :] < lengths.to(logprob.device)[:, None]
    count = lengths.clamp_min(1).double().to(logprob.device)
    mean_logprob = torch.where(live, logprob.double(), 0.0).sum(1) / count
    mean_energy = torch.where(live, energy.double(), 0.0).sum(1) / count
    return TokenStatistics(mean_logprob.cpu(), mean_energy.cpu())


def perplexity(mean_logprob: float) -> float:
    """exp(-mean log p): higher = the model found its own answer less likely."""
    return math.exp(-mean_logprob)


def ln_entropy(mean_logprobs: Sequence[float]) -> float:
    """Length-normalised entropy of K sampled answers, -(1/K) sum_k mean_t log p(z_kt): higher = less certain."""
    if not len(mean_logprobs):
        raise ValueError("LN-entropy needs at least one sampled answer")
    return -sum(mean_logprobs) / len(mean_logprobs)


def lexical_similarity(texts: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over all pairs of the K answers: higher = the answers agree (LESS likely a
    hallucination, the opposite orientation of the other scores)."""
    pairs = list(combinations(texts, 2))
    if not pairs:
        raise ValueError(f"lexical similarity needs at least 2 answers, got {len(texts)}")
    return sum(rouge_l(a, b) for a, b in pairs) / len(pairs)
