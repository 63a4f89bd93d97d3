"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning multi-level features with Matryoshka sparse
autoencoders"): BatchTopK latents in nested groups, each prefix of groups trained to reconstruct on its own."""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import Tensor

from neurolight.lightning_modules.sae.architectures.batchtopk import BatchTopK


class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK over all latents; the loss sums the reconstruction errors of every prefix of latent groups
    (Bussmann et al. 2025), so the first groups must reconstruct without the later ones and learn the
    general features that the later, more specific ones would otherwise absorb."""

    def __init__(
        self,
        k: int = 32,
        group_sizes: list[int] | None = None,
        auxk_coefficient: float = 1 / 32,
        k_aux: int | None = None,
        threshold_momentum: float = 0.99,
        encoder_init_scale: float | None = None,
        decoder_init_norm: float | None = None,
    ) -> None:
        """
        Args:
            k: Mean latents active per token over a batch, over all groups; lower it for a lower L0.
            group_sizes: Latents per group, in order; they must sum to d_sae. Default: five groups, each twice
                the one before (d_sae * 1/31, 2/31, 4/31, 8/31, 16/31, the last taking the rounding rest).
            auxk_coefficient: Weight of the AuxK loss on dead latents (Gao et al. 2024, appendix A.2: 1/32).
            k_aux: Dead latents the AuxK loss uses per token; default d_in / 2.
            threshold_momentum: Momentum of the exponential moving average of the smallest kept activation, the
                threshold used at inference.
            encoder_init_scale: The encoder starts as this multiple of the unit-norm decoder; None: the
                least-squares multiple, as for TopK (docs/sae.md, Initialisation). 1.0: W_enc = W_dec.
            decoder_init_norm: None: unit-norm decoder rows; a norm: free rows started there, as for TopK
                (docs/sae.md, Free decoder norms).
        """
        super().__init__(k, auxk_coefficient, k_aux, threshold_momentum, encoder_init_scale, decoder_init_norm)
        if group_sizes is not None and (not group_sizes or min(group_sizes) < 1):
            raise ValueError(f"group_sizes={group_sizes} must be a non-empty list of positive sizes")
        self.group_sizes = None if group_sizes is None else list(group_sizes)

    def check(self, d_in: int, d_sae: int) -> None:
        super().check(d_in, d_sae)
        if self.group_sizes is not None and sum(self.group_sizes) != d_sae:
            raise ValueError(
                f"group_sizes={self.group_sizes} sum to {sum(self.group_sizes)}, not to d_sae={d_sae}; make the "
                "last group the rest"
            )

    def sizes(self, d_sae: int) -> list[int]:
        """The group sizes of an SAE with d_sae latents (``group_sizes``, or the doubling default)."""
        if self.group_sizes is not None:
            return self.group_sizes
        sizes = [max(1, d_sae * 2**i // 31) for i in range(4)]
        return [*sizes, d_sae - sum(sizes)]

    def prefix_losses(self, sae, x: Tensor, latents: Tensor, mse: Tensor) -> Tensor:
        """(groups,) squared error, summed over d_in and averaged over the batch, of the reconstruction from the
        first 1, 2, ... groups' latents alone (+ b_dec); the last is ``mse``, the whole dictionary's."""
        ends = list(accumulate(self.sizes(sae.d_sae)))
        x_hat, start, losses, decoder = sae.b_dec, 0, [], sae.decoder_weight()
        for end in ends[:-1]:
            x_hat = x_hat + latents[:, start:end] @ decoder[start:end]
            losses.append((x - x_hat).pow(2).sum(-1).mean())
            start = end
        return torch.stack([*losses, mse])

    def reconstruction_loss(self, sae, x: Tensor, latents: Tensor, mse: Tensor) -> Tensor:
        # Bussmann et al. 2025 sum the nested prefixes' losses (not their mean), as SAELens does.
        return self.prefix_losses(sae, x, latents, mse).sum()
