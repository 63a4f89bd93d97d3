"""Where an answer ends: the answer is the first line with visible text of what the model generated after the
prompt. Generation stops a row at EOS, or at the first token holding a newline once the answer has visible text
(blank lines before it are skipped); the answer is that line, stripped. docs/send.md, How the answers are generated.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor


class StopTokens(NamedTuple):
    """Per vocabulary id, what its text means for the end of an answer line; (vocab,) bool tensors."""

    eos: Tensor
    """End-of-sequence tokens (the tokenizer's and the generation config's)."""
    newline: Tensor
    """Tokens whose text holds a newline: "\\n", ".\\n", "\\n\\n", "\\nThe"."""
    text_before_newline: Tensor
    """Tokens with visible text before their first newline (".\\n")."""
    blank: Tensor
    """Tokens whose text is only white space (or empty)."""


def stop_tokens(tokenizer, eos_ids: Iterable[int], vocab_size: int | None = None) -> StopTokens:
    """Classify every token id of ``tokenizer`` (``vocab_size``: the model's, if its embedding has spare rows)."""
    size = max(len(tokenizer), vocab_size or 0)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    texts += ["\ufffd"] * (size - len(texts))  # unused rows of a padded embedding: ordinary text
    eos = torch.zeros(size, dtype=torch.bool)
    eos[[i for i in eos_ids if i is not None and 0 <= i < size]] = True
    return StopTokens(
        eos=eos,
        newline=torch.tensor(["\n" in text for text in texts]),
        text_before_newline=torch.tensor([bool(text.split("\n", 1)[0].strip()) for text in texts]),
        blank=torch.tensor([not text.strip() for text in texts]),
    )


def first_stop(generated: Tensor, stops: StopTokens) -> tuple[Tensor, Tensor]:
    """Where each answer line of ``generated`` (rows, new_tokens), the tokens after the prompt, ends.

    A row ends at its first EOS, or at its first newline token once the answer has visible text (white space and
    empty lines before the answer are skipped: "Answer:\\n Paris\\n" answers "Paris").

    Returns:
        ``position`` (rows,): index of the stop token (``new_tokens`` when none came) and ``stopped`` (rows,) bool.
    """
    flags = [flag.to(generated.device)[generated] for flag in stops]
    eos, newline, text_before_newline, blank = flags
    seen_text = (~blank).long().cumsum(1) - (~blank).long() > 0  # visible text strictly before this token
    is_stop = eos | (newline & (seen_text | text_before_newline))
    stopped = is_stop.any(1)
    position = torch.where(stopped, is_stop.int().argmax(1), generated.shape[1])
    return position, stopped


class Answers(NamedTuple):
    """Answers cut at their stop token, from ``cut_answers``."""

    texts: list[str]
    """Per row: the first non-empty line of the answer, stripped."""
    num_tokens: Tensor
    """(rows,) answer tokens before the stop token (all generated tokens when no stop token came)."""
    stopped: Tensor
    """(rows,) bool: a stop token (newline or EOS) ended the row, rather than ``max_new_tokens``."""


def cut_answers(generated: Tensor, stops: StopTokens, tokenizer) -> Answers:
    """Cut each row of ``generated`` (rows, new_tokens), the tokens after the prompt, at the end of its answer line.

    The stop token is decoded with the answer and the text cut at its newline, so a token like ".\\n" keeps its
    "."; anything after the stop token (more lines, padding) is ignored.
    """
    position, stopped = first_stop(generated, stops)
    texts = []
    for row, n in enumerate(position.tolist()):
        text = tokenizer.decode(generated[row, : n + 1].tolist(), skip_special_tokens=True)
        texts.append(next((line.strip() for line in text.split("\n") if line.strip()), ""))
    return Answers(texts, position.cpu(), stopped.cpu())
