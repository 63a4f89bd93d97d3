"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping ahead: improving reconstruction fidelity with JumpReLU sparse
autoencoders"): a learned per-latent threshold, trained with an L0 penalty through straight-through estimators."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from neurolight.lightning_modules.sae.architectures.base import Architecture, ResampleReset


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre_acts * H(pre_acts - threshold); pre_acts (batch, d_sae), threshold (d_sae,)."""

    @staticmethod
    def forward(ctx, pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return pre_acts * (pre_acts > threshold)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        pre_acts, threshold = ctx.saved_tensors
        # JumpReLU paper, eq. 11: the jump's gradient to the threshold is estimated with a rectangle kernel of
        # width `bandwidth`, -(θ/ε) K((z - θ)/ε); away from the jump the gradient to z is the exact one.
        window = _rectangle((pre_acts - threshold) / ctx.bandwidth)
        grad_threshold = -(threshold / ctx.bandwidth) * (window * grad_output).sum(0)
        return grad_output * (pre_acts > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    """H(pre_acts - threshold), the per-latent L0; gradient only to the threshold (JumpReLU paper, eq. 12)."""

    @staticmethod
    def forward(ctx, pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        pre_acts, threshold = ctx.saved_tensors
        window = _rectangle((pre_acts - threshold) / ctx.bandwidth)
        return None, -(window * grad_output).sum(0) / ctx.bandwidth, None


class JumpReLU(Architecture):
    """f = pre_acts * H(pre_acts - θ) with a learned θ per latent (parameter ``log_threshold``); the loss adds
    ``l0_coefficient`` * L0."""

    sparsity_setting = "l0_coefficient"
    sparsity_note = (
        "; Adam moves the learned log thresholds by about the learning rate per step, so over a short run L0 "
        "follows init_threshold: raise it too, to about sqrt(l0_coefficient)"
    )

    def __init__(
        self,
        l0_coefficient: float = 4.0,
        bandwidth: float = 0.05,
        init_threshold: float = 2.0,
        normalize_decoder: bool = False,
    ) -> None:
        """
        Args:
            l0_coefficient: Weight of the L0 penalty: the squared error a latent must remove to be worth firing,
                so thresholds settle near sqrt(l0_coefficient); raise it for a lower L0.
            bandwidth: Width ε of the rectangle kernel of the straight-through threshold gradients. Rajamanoharan
                et al. 2024 use 0.001 on inputs of unit mean squared norm; inputs scaled to E||x|| = sqrt(d_in)
                are sqrt(d_in) times larger, and 0.05 is that 0.001 for d_in of about 2500.
            init_threshold: Initial threshold θ of every latent; resampled latents get it back. Adam moves log θ
                by about the learning rate per step, so θ stays near it for thousands of steps: it starts at
                sqrt(l0_coefficient), where it would settle, and not at the paper's small value, which leaves half
                the latents firing until θ has grown.
            normalize_decoder: Keep decoder rows at unit norm. Off by default: the L0 penalty cannot be lowered by
                shrinking f and growing W_dec, as an L1 penalty can.
        """
        if l0_coefficient < 0:
            raise ValueError(f"l0_coefficient={l0_coefficient} must be >= 0")
        if bandwidth <= 0 or init_threshold <= 0:
            raise ValueError(f"bandwidth={bandwidth} and init_threshold={init_threshold} must both be positive")
        self.l0_coefficient, self.bandwidth, self.init_threshold = l0_coefficient, bandwidth, init_threshold
        self.normalize_decoder = normalize_decoder

    def tensors(self, d_in: int, d_sae: int) -> dict[str, Tensor]:
        # log θ keeps the threshold positive (JumpReLU paper, section 4).
        return {"log_threshold": nn.Parameter(torch.full((d_sae,), float(self.init_threshold)).log())}

    def activation(self, sae, pre_acts: Tensor, update: bool) -> Tensor:
        return _JumpReLU.apply(pre_acts, sae.log_threshold.exp(), self.bandwidth)

    def inference_threshold(self, sae) -> Tensor:
        return sae.log_threshold.exp()

    def sparsity_loss(self, sae, pre_acts: Tensor, latents: Tensor) -> Tensor:
        l0 = _Step.apply(pre_acts, sae.log_threshold.exp(), self.bandwidth)
        return self.l0_coefficient * l0.sum(-1).mean()

    def resample_resets(self) -> list[ResampleReset]:
        return [ResampleReset("log_threshold", math.log(self.init_threshold))]
