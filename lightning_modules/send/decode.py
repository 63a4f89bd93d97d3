"""One decoding loop for every answer to a batch of prompts: the scored (greedy) answer and the K sampled ones.

Each prompt is run once (all of it but its last token, through the decoder only: no LM head over the prompt), its
KV cache is copied for its ``copies`` rows, and all rows then decode together, one token a step, until every row
has ended its answer line (``answer_lines``) or ``max_new_tokens`` came. Per step the loop keeps only what the
scores need: the chosen token, its log-probability and the energy under the raw logits, and, on request, the
hidden state of one layer at the step's input. docs/send.md, How the answers are generated.

Why not ``model.generate``: its sampler draws from the whole vocabulary at every step (an exponential variate per
vocabulary entry, and a full sort for top-p) although top-k = 10 leaves ten candidates, and the greedy and the
sampled answers need two calls, so two passes over the weights per step. docs/send.md, How the answers are generated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from neurolight.datamodules.llm.models import cache_argument
from neurolight.lightning_modules.send.answer_lines import StopTokens
from neurolight.lightning_modules.send.detection_scores import step_scores


class Sampler(NamedTuple):
    """How one row picks its tokens from the raw logits, in Hugging Face's order: temperature, top-k, top-p."""

    temperature: float = 0.0
    """0 = greedy (argmax); otherwise the logits are divided by it before top-k / top-p and sampling."""
    top_p: float = 1.0
    """Keep the most likely tokens until their probability reaches top_p (1.0 = off; the top token always stays)."""
    top_k: int = 0
    """Keep the top_k most likely tokens (0 = off)."""


def candidates(logits: Tensor, sampler: Sampler) -> tuple[Tensor, Tensor]:
    """The tokens a sampling ``sampler`` may draw from ``logits`` (rows, vocab), and their probabilities:
    ``ids`` and ``probs`` (rows, candidates), most likely first, 0 for a candidate that top-p dropped.

    Top-p is applied after top-k, as Hugging Face's warpers do, so with top-k on everything runs on the k
    candidates: a token is dropped when the tokens ranked above it already hold top_p of the probability (Hugging
    Face: its ascending cumulative probability is <= 1 - top_p; the same set). Ties at the k-th logit keep exactly
    k tokens, where Hugging Face keeps every tied token.
    """
    if sampler.temperature <= 0:
        raise ValueError("a greedy sampler (temperature 0) has no candidates to draw from: it takes the argmax")
    if 0 < sampler.top_k < logits.shape[-1]:  # the top k of logits / T are those of the logits: T > 0
        values, ids = logits.topk(sampler.top_k, dim=-1)  # sorted, largest first
    else:
        values, ids = logits.sort(-1, descending=True)
    values = values.float() / sampler.temperature
    if sampler.top_p < 1.0:
        probs = values.softmax(-1)
        above = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        values = values.masked_fill(above >= sampler.top_p, float("-inf"))  # the top token has 0 above: kept
    return ids, values.softmax(-1)


def choose_tokens(logits: Tensor, sampler: Sampler) -> Tensor:
    """(rows,) token ids from ``logits`` (rows, vocab): the argmax for a greedy ``sampler``, else a draw from its
    ``candidates`` with torch's global generator (seeded by ``seed_everything``)."""
    if sampler.temperature == 0:
        return logits.argmax(-1)
    ids, probs = candidates(logits, sampler)
    return ids.gather(-1, torch.multinomial(probs, 1)).squeeze(-1)


class Generation(NamedTuple):
    """What ``decode`` returns; rows of one prompt are consecutive (``copies`` a prompt)."""

    tokens: Tensor
    """(rows, steps) token ids after the prompt. A row is padded with ``pad_token_id`` after its stop token."""
    logprob: Tensor
    """(rows, steps) float32: log p(token) under the raw logits (temperature 1, no top-k / top-p)."""
    energy: Tensor
    """(rows, steps) float32: -T logsumexp(logits / T) of the logits that chose each token."""
    hidden: Tensor | None = None
    """(rows, steps', d) float32, with ``hidden_layer`` only: the hidden state of that layer at the input of each
    step (step 0: the last prompt token; step i: token i - 1). ``steps'`` = steps + 1 when a row ran to
    ``max_new_tokens`` (one forward more, so its last token has a state), else ``steps``."""


def _output_cache(output):
    # The output's attribute was renamed with the argument (datamodules.llm.models.cache_argument).
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def decode(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    samplers: list[Sampler],
    max_new_tokens: int,
    stops: StopTokens,
    pad_token_id: int,
    energy_temperature: float = 1.0,
    hidden_layer: int | None = None,
) -> Generation:
    """Decode ``len(samplers)`` rows per prompt of ``input_ids`` (prompts, width), left padded; row j of a prompt
    picks its tokens with ``samplers[j]``.

    Args:
        model: A Hugging Face causal LM with ``get_decoder()`` and a KV cache.
        stops: The token classes that end an answer line (``answer_lines.stop_tokens``), on the model's device.
        hidden_layer: Index into Hugging Face's ``hidden_states`` (0 = embeddings) whose state to keep per step.
    """
    prompts, width = input_ids.shape
    copies = len(samplers)
    rows = prompts * copies
    device = input_ids.device
    cache = None
    if width > 1:  # the prompt but its last token, which step 0 feeds to get the first token's logits
        decoder, mask = model.get_decoder(), attention_mask[:, :-1]
        prefill = decoder(
            input_ids=input_ids[:, :-1], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            use_cache=True,
        )  # fmt: skip
        cache = _output_cache(prefill)
        cache.batch_repeat_interleave(copies)
    mask = attention_mask.repeat_interleave(copies, 0)
    position = mask.sum(-1, keepdim=True) - 1  # left padding: the last prompt token's position
    step_input = input_ids[:, -1:].repeat_interleave(copies, 0)
    kinds = list(dict.fromkeys(samplers))  # the distinct samplers; kind[r]: which one row r uses
    kind = torch.tensor([kinds.index(sampler) for sampler in samplers], device=device).repeat(prompts)

    def groups_of(live: Tensor) -> list[tuple[Sampler, Tensor]]:
        # Each sampler's lines of the running batch; they change only when rows leave it.
        groups = [(sampler, (kind[live] == index).nonzero().squeeze(1)) for index, sampler in enumerate(kinds)]
        return [(sampler, lines) for sampler, lines in groups if len(lines)]

    cache_name = cache_argument(type(model).forward)
    eos, newline, text_before_newline, blank = stops
    seen_text = torch.zeros(rows, dtype=torch.bool, device=device)
    stopped = torch.zeros_like(seen_text)
    live = torch.arange(rows, device=device)  # the row of each line of the running batch
    groups = groups_of(live)
    tokens, logprobs, energies, hidden = [], [], [], []
    for step in range(max_new_tokens + 1):
        out = model(
            input_ids=step_input, attention_mask=mask, position_ids=position, use_cache=True,
            output_hidden_states=hidden_layer is not None, **{cache_name: cache},
        )  # fmt: skip
        cache = _output_cache(out)
        if hidden_layer is not None:
            state = out.hidden_states[hidden_layer][:, -1].float()
            hidden.append(state.new_zeros(rows, state.shape[-1]).index_copy_(0, live, state))
        if step == max_new_tokens:  # only the last token's hidden state was missing
            break
        logits = out.logits[:, -1]
        chosen = torch.empty(len(live), dtype=torch.long, device=device)
        for sampler, lines in groups:
            chosen[lines] = choose_tokens(logits[lines], sampler)
        chosen = torch.where(stopped[live], pad_token_id, chosen)
        logprob, energy = step_scores(logits, chosen, energy_temperature)
        tokens.append(torch.full((rows,), pad_token_id, device=device).index_copy_(0, live, chosen))
        logprobs.append(logprob.new_zeros(rows).index_copy_(0, live, logprob))
        energies.append(energy.new_zeros(rows).index_copy_(0, live, energy))
        # answer_lines.first_stop, one token at a time: EOS, or a newline once the answer has visible text.
        ended = eos[chosen] | (newline[chosen] & (seen_text[live] | text_before_newline[chosen]))
        seen_text[live] |= ~blank[chosen]
        stopped[live] |= ended
        if bool(stopped.all()) or (hidden_layer is None and step == max_new_tokens - 1):
            break
        step_input, position = chosen[:, None], position + 1
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
        running = ~stopped[live]
        if running.sum() <= len(live) * 7 // 8:  # an eighth of the batch has ended: stop computing those rows
            keep = running.nonzero().squeeze(1)
            live, step_input, position, mask = live[keep], step_input[keep], position[keep], mask[keep]
            cache.batch_select_indices(keep)
            groups = groups_of(live)
    return Generation(
        torch.stack(tokens, 1),
        torch.stack(logprobs, 1),
        torch.stack(energies, 1),
        torch.stack(hidden, 1) if hidden_layer is not None else None,
    )
