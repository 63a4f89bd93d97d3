"""Simulation and scoring of latent explanations: pure functions of a causal LM and token ids.

``simulate_logits`` is the all-at-once simulator (docs/interpret.md, Simulation): one forward pass per record
reads, at every token's value slot, the next-token probabilities of the single-token values "0", "1", ...,
renormalises them and takes the expected value. The prompt that a latent's records share (instructions,
demonstration, explanation) runs once; the records, batched with right padding, continue from its key/value cache.

``simulate_generate`` is the generate-and-parse baseline (the model writes ``token<TAB>value`` lines, a regular
expression parses them), kept for ``bench/interpret_throughput.py`` and as
``LatentInterpreter(simulator="generate")``.

Values that are several tokens in the explainer's tokenizer cannot be read from one distribution: Llama and
SmolLM2 tokenizers write "10" as "1" "0", so with them the simulation scale is 0-9 (the prompt says so, and the
demonstration's values are capped at 9). Pearson correlation does not depend on the scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc

from neurolight.datamodules.llm.padding import pad_left, pad_right
from neurolight.lightning_modules.interpret.prompts import SimulationPrompt, escape_token, value_lines


def discretize(activations: Tensor, max_activation: float, max_value: int = 10) -> Tensor:
    """floor(max_value * relu(a) / max_activation) as int64 in [0, max_value]; all 0 when max_activation <= 0."""
    if max_activation <= 0:
        return torch.zeros(activations.shape, dtype=torch.long)
    scaled = torch.floor(max_value * activations.double().clamp_min(0) / max_activation)
    return scaled.clamp(0, max_value).long()


def pearson(true: Tensor, simulated: Tensor) -> float:
    """Pearson correlation of two equally long series (float64); NaN when either is constant or shorter than 2."""
    x, y = true.double().flatten(), simulated.double().flatten()
    if x.shape != y.shape:
        raise ValueError(f"true activations ({x.numel()}) and simulated ones ({y.numel()}) differ in length")
    if x.numel() < 2 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum()))


def balanced_accuracy(predicted: Tensor, labels: Tensor) -> float:
    """Mean of the true-positive and true-negative rates of bool ``predicted`` against bool ``labels``; NaN when
    one class has no example."""
    predicted, labels = predicted.bool(), labels.bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    true_positives = int((predicted & labels).sum())
    true_negatives = int((~predicted & ~labels).sum())
    return 0.5 * (true_positives / positives + true_negatives / negatives)


def auroc(p_yes: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of the judge's (N,) P(Yes) against bool ``labels`` (N,): the probability that a
    positive item gets a higher P(Yes) than a negative one, ties counting 1/2; threshold-free, unlike
    ``balanced_accuracy`` at P(Yes) > 1/2 (docs/interpret.md, Detection). NaN when one class has no example."""
    labels = labels.bool()
    if p_yes.shape != labels.shape:
        raise ValueError(f"{p_yes.numel()} probabilities but {labels.numel()} labels")
    if bool(labels.all()) or not bool(labels.any()):
        return math.nan
    return float(binary_auroc(p_yes.double(), labels.long()))


def expected_values(value_logits: Tensor) -> Tensor:
    """(..., V) logits of the value tokens 0..V-1 -> (...) expected value under their renormalised softmax."""
    probabilities = value_logits.float().softmax(-1)
    return probabilities @ torch.arange(value_logits.shape[-1], dtype=torch.float32, device=value_logits.device)


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for sequence in sequences[1:]:
        length = next((i for i in range(length) if sequence[i] != first[i]), length)
    return length


@torch.no_grad()
def read_logits(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    columns: Tensor,
    pad_id: int,
    batch_size: int,
) -> tuple[list[Tensor], int]:
    """Per sequence, the logits of the vocabulary ``columns`` (C,) at its ``positions``: a list of
    (len(positions[i]), C) float32, and the number of forward passes run.

    The prefix that all sequences share (the prompt before the record) runs once and its key/value cache is reused
    by every batch of ``batch_size`` right-padded remainders. The LM head runs only on the read positions (full
    (rows, length, vocab) logits would be ~100x larger). Calling the decoder and head modules keeps ZeRO-3's
    parameter gathering hooks in play.
    """
    import copy

    if not sequences:
        return [], 0
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # The shared prefix must end before the first read position, so that every read lies in a remainder.
    shared = min(common_prefix_length(sequences), min((min(p) for p in positions if len(p)), default=0))
    cache, passes = None, 0
    if shared > 0:
        prefix = torch.tensor([list(sequences[0][:shared])], device=device)
        cache = decoder(input_ids=prefix, use_cache=True).cache
        passes += 1
    results = []
    for first in range(0, len(sequences), batch_size):
        rows = range(first, min(first + batch_size, len(sequences)))
        ids, mask = pad_right([sequences[i][shared:] for i in rows], pad_id, device)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(rows))
            mask = torch.cat([torch.ones(len(rows), shared, dtype=mask.dtype, device=device), mask], 1)
        hidden = decoder(input_ids=ids, attention_mask=mask, cache=past, use_cache=past is not None)
        hidden = hidden.last_hidden_state
        passes += 1
        index_rows = torch.cat([torch.full((len(positions[i]),), r) for r, i in enumerate(rows)]).to(device)
        index_cols = torch.cat([torch.as_tensor(positions[i]) - shared for i in rows]).to(device)
        logits = head(hidden[index_rows, index_cols]).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2 squashes its logits; probabilities must come from the squashed ones
            logits = torch.tanh(logits / cap) * cap
        results += list(logits[:, columns.to(device)].cpu().split([len(positions[i]) for i in rows]))
    return results, passes


def simulate_logits(
    model: nn.Module, prompts: Sequence[SimulationPrompt], value_ids: Sequence[int], pad_id: int, batch_size: int
) -> tuple[list[Tensor], int]:
    """Expected value (T,) float32 at every token of every record (``batch_size`` records per forward pass, the
    shared prompt run once), and the number of forward passes."""
    columns = torch.tensor(list(value_ids))
    logits, passes = read_logits(
        model, [p.input_ids for p in prompts], [p.read_positions for p in prompts], columns, pad_id, batch_size
    )
    return [expected_values(row) for row in logits], passes


def yes_probabilities(
    model: nn.Module, prompts: Sequence[Sequence[int]], yes_id: int, no_id: int, pad_id: int, batch_size: int
) -> tuple[Tensor, int]:
    """(N,) float32 P(Yes) / (P(Yes) + P(No)) of the reply after each detection prompt, and the forward passes."""
    columns = torch.tensor([yes_id, no_id])
    logits, passes = read_logits(model, prompts, [[len(p) - 1] for p in prompts], columns, pad_id, batch_size)
    probabilities = [row[0].softmax(-1)[0] for row in logits]
    return (torch.stack(probabilities) if probabilities else torch.zeros(0)), passes


_LINE = re.compile(r"^(.*)\t\s*(\d+)")
_LOOKAHEAD = 4


def parse_simulation(text: str, tokens: Sequence[str], max_value: int) -> Tensor:
    """Values (T,) float32 of generated ``token<TAB>value`` lines, aligned to the record's positions.

    A line goes to the next position whose escaped token it repeats within a few positions (the model skipped
    tokens) or, when its token matches none (the model garbled it), to the next position. Positions without a line
    stay 0; values above ``max_value`` are capped.
    """
    expected = [escape_token(token) for token in tokens]
    values = torch.zeros(len(tokens), dtype=torch.float32)
    position = 0
    for line in text.split("\n"):
        if "<end>" in line or position >= len(expected):
            break
        match = _LINE.match(line)
        if match is None:
            continue
        token, value = match.group(1), min(int(match.group(2)), max_value)
        window = range(position, min(position + _LOOKAHEAD, len(expected)))
        target = next((k for k in window if expected[k] == token), position)
        values[target] = value
        position = target + 1
    return values


def simulate_generate(
    model: nn.Module,
    tokenizer,
    starts: Sequence[Sequence[int]],
    records: Sequence[Sequence[str]],
    max_value: int,
    pad_id: int,
    batch_size: int,
    synced_gpus: bool = False,
) -> tuple[list[Tensor], int]:
    """The generate-and-parse baseline: greedy continuation of every ``starts`` prompt (ending in ``<start>``),
    parsed with ``parse_simulation`` against the record's tokens; (T,) float32 per record, and the number of
    ``generate`` calls. Every record is generated from its whole prompt (no shared key/value cache)."""
    device = next(model.parameters()).device
    budget = [len(tokenizer(value_lines(tokens, ["0"] * len(tokens)) + "<end>")["input_ids"]) + 8 for tokens in records]
    simulated, calls = [], 0
    for first in range(0, len(starts), batch_size):
        chunk = slice(first, first + batch_size)
        calls += 1
        ids, mask = pad_left(starts[chunk], pad_id, device)
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(budget[chunk]),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            stop_strings=["<end>"],
            tokenizer=tokenizer,
            synced_gpus=synced_gpus,
        )[:, ids.shape[1] :]
        for row, tokens in enumerate(records[chunk]):
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            simulated.append(parse_simulation(text, tokens, max_value))
    return simulated, calls
