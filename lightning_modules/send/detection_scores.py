"""The baselines INSIDE compares EigenScore with (Chen et al., ICLR 2024, section 4.1 and Table 1), per question,
from the logits ``generate`` already returned and the answer texts: no extra forward pass. docs/send.md, Baselines.

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


def token_statistics(
    logits: Sequence[Tensor], generated: Tensor, lengths: Tensor, energy_temperature: float = 1.0
) -> TokenStatistics:
    """Means over the first ``lengths[r]`` tokens of each row of ``generated`` (rows, steps).

    Args:
        logits: per generation step, the raw logits (rows, vocab) that chose the token of that step
            (``generate(..., output_logits=True)``).
        generated: (rows, steps) token ids after the prompt.
        lengths: (rows,) tokens scored per row, at least 1 (``scored_lengths``).
        energy_temperature: T of the energy score.
    """
    if energy_temperature <= 0:
        raise ValueError(f"energy_temperature={energy_temperature} must be positive")
    if len(logits) != generated.shape[1]:
        raise ValueError(f"{len(logits)} logit steps for {generated.shape[1]} generated tokens; they must match")
    rows = len(generated)
    lengths = lengths.to(generated.device)
    logprob_sum = torch.zeros(rows, dtype=torch.float64, device=generated.device)
    energy_sum = torch.zeros_like(logprob_sum)
    for step, step_logits in enumerate(logits):
        live = step < lengths
        if not live.any():
            break
        step_logits = step_logits.double()
        token_logprob = step_logits.log_softmax(-1).gather(1, generated[:, step : step + 1]).squeeze(1)
        energy = -energy_temperature * torch.logsumexp(step_logits / energy_temperature, -1)
        logprob_sum += torch.where(live, token_logprob, 0.0)
        energy_sum += torch.where(live, energy, 0.0)
    count = lengths.clamp_min(1).double()
    return TokenStatistics((logprob_sum / count).cpu(), (energy_sum / count).cpu())


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
