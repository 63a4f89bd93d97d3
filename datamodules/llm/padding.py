"""Batching token sequences of different lengths: one pair of padding helpers for every pipeline.

Right padding suits teacher-forced forwards (a causal read never sees a later pad); left padding suits
``generate``, which continues every row at the last column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _pad(sequences: Sequence[Sequence[int] | Tensor], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    if not sequences:
        raise ValueError("nothing to pad: the batch has no sequences")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        columns = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, columns] = torch.as_tensor(sequence, dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask


def pad_right(
    sequences: Sequence[Sequence[int] | Tensor], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(rows, longest) ids and attention mask, padded at the end of each row."""
    ids, mask = _pad(sequences, pad_id, left=False)
    return ids.to(device), mask.to(device)


def pad_left(
    sequences: Sequence[Sequence[int] | Tensor], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(rows, longest) ids and attention mask, padded at the start of each row (for ``generate``)."""
    ids, mask = _pad(sequences, pad_id, left=True)
    return ids.to(device), mask.to(device)


def pad_labels(labels: Sequence[Sequence[int]], width: int, ignore_index: int = -100) -> Tensor:
    """(rows, width) right-padded label ids; the padding is ``ignore_index`` (no loss there)."""
    out = torch.full((len(labels), width), ignore_index, dtype=torch.long)
    for row, target in enumerate(labels):
        out[row, : len(target)] = torch.as_tensor(target, dtype=torch.long)
    return out
