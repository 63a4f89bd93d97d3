"""ReLU SAE with an L1 penalty (Bricken et al. 2023, "Towards Monosemanticity"; Anthropic circuits update, April
2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from neurolight.lightning_modules.sae.architectures.base import Architecture


class ReLU(Architecture):
    """f = ReLU(pre_acts); sparsity comes from ``l1_coefficient`` * sum_i f_i ||W_dec,i||."""

    sparsity_setting = "l1_coefficient"

    def __init__(self, l1_coefficient: float = 5.0, normalize_decoder: bool = True) -> None:
        """
        Args:
            l1_coefficient: Weight of the L1 penalty; raise it for a lower L0. The default 5 is the Anthropic
                April 2024 update's, for the same loss (squared error summed over d_in) on inputs scaled to
                E||x|| = sqrt(d_in), as ``normalize_dataset`` scales them.
            normalize_decoder: Keep decoder rows at unit norm (Towards Monosemanticity). False: no constraint,
                and the L1 weighs each latent by its decoder row's norm instead (April 2024 update), so that the
                SAE cannot shrink f and grow W_dec for free; the two penalties agree on unit-norm rows.
        """
        if l1_coefficient < 0:
            raise ValueError(f"l1_coefficient={l1_coefficient} must be >= 0")
        self.l1_coefficient = l1_coefficient
        self.normalize_decoder = normalize_decoder

    def activation(self, sae, pre_acts: Tensor, update: bool) -> Tensor:
        return torch.relu(pre_acts)

    def sparsity_loss(self, sae, pre_acts: Tensor, latents: Tensor) -> Tensor:
        l1 = latents.abs()
        if not self.normalize_decoder:
            l1 = l1 * sae.W_dec.norm(dim=1)
        return self.l1_coefficient * l1.sum(-1).mean()
