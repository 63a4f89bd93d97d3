"""SAE metrics over a whole evaluation set (docs/sae.md, Metrics)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - FVU of one batch: 1 - ||x - x_hat||^2 / ||x - mean(x)||^2, the mean taken over the batch's rows."""
    residual = (x - x_hat).float().pow(2).sum()
    total = (x - x.mean(0)).float().pow(2).sum()
    return 1 - residual / total


def firing_counts(latents: Tensor) -> Tensor:
    """(d_sae,) int64: in how many rows (tokens) of ``latents`` (batch, d_sae) each latent fires (is > 0).

    Counted as ``latents > 0`` written straight into float32 and summed, which is exact below 2**24 rows: ``(latents
    > 0).sum(0)`` widens the booleans to int64 first, and took 1.6 against 0.6 ms on a 512 x 2304 batch (one CPU
    thread), ~7% of a TopK SAE's training step there."""
    if len(latents) >= 2**24:
        return (latents > 0).sum(0)
    fired = torch.empty(latents.shape, dtype=torch.float32, device=latents.device)
    return torch.gt(latents.detach(), 0, out=fired).sum(0).long()


class ExplainedVariance(Metric):
    """1 - FVU over every row seen (all batches, all ranks): the residual and total sums of squares are
    accumulated and divided once, so the result is the explained variance of the whole set, not a mean of
    per-batch ratios (which weights small batches alike and takes each batch's own mean)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("residual", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_squares", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: (rows, d_in)."""
        x64 = x.detach().double()
        if self.sum.numel() == 0:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        self.residual += (x64 - x_hat.detach().double()).pow(2).sum()
        self.sum_squares += x64.pow(2).sum()
        self.sum += x64.sum(0)
        self.rows += x.shape[0]

    def compute(self) -> Tensor:
        # sum ||x - mean||^2 = sum ||x||^2 - ||sum x||^2 / n, in float64 (the difference of two large sums).
        total = self.sum_squares - self.sum.pow(2).sum() / self.rows
        return (1 - self.residual / total).float()
