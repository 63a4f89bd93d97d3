"""Sparse autoencoders for dictionary learning on LLM activations: ReLU, TopK, BatchTopK and JumpReLU.

A plain ``nn.Module`` (no Lightning), so a trained SAE loads and runs on its own::

    sae = SparseAutoencoder(d_in=576, d_sae=576 * 16, architecture="topk", k=32)
    out = sae(x, dead_mask=dead)  # SaeOutput(x_hat, latents, pre_acts, mse, sparsity, auxk, loss)
    out.loss.backward()

Sources: Bricken et al. 2023 "Towards Monosemanticity" (ReLU + L1, unit-norm decoder); Anthropic circuits update,
April 2024 (tied init, L1 weighted by decoder norm); Gao et al. 2024 "Scaling and evaluating sparse autoencoders"
(TopK, AuxK); Bussmann et al. 2024 "BatchTopK sparse autoencoders"; Rajamanoharan et al. 2024 "Jumping ahead:
improving reconstruction fidelity with JumpReLU sparse autoencoders".
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


class SaeOutput(NamedTuple):
    """What ``SparseAutoencoder.forward`` returns; every loss term is already multiplied by its coefficient."""

    x_hat: Tensor
    """(batch, d_in) reconstruction."""
    latents: Tensor
    """(batch, d_sae) codes after the activation; a latent fires where it is > 0."""
    pre_acts: Tensor
    """(batch, d_sae) encoder pre-activations."""
    mse: Tensor
    """Scalar: squared error summed over d_in, mean over batch."""
    sparsity: Tensor
    """Scalar: L1 (relu) or L0 (jumprelu) penalty times ``l1_coefficient``; 0 for topk and batchtopk."""
    auxk: Tensor
    """Scalar: AuxK loss times ``auxk_coefficient`` (topk and batchtopk with dead latents); else 0."""
    loss: Tensor
    """Scalar: mse + sparsity + auxk."""


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


def _row_topk(pre_acts: Tensor, k: int) -> Tensor:
    values, indices = pre_acts.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_acts).scatter(-1, indices, F.relu(values))


class SparseAutoencoder(nn.Module):
    """x_hat = f(x) @ W_dec + b_dec with f = activation((x - b_dec) @ W_enc.T + b_enc).

    Each row of ``W_enc`` and ``W_dec`` (both (d_sae, d_in)) belongs to one latent. ``architecture`` picks the
    activation and sparsity rule: "relu" (L1 penalty), "topk" (k largest per token), "batchtopk" (k * batch
    largest over the batch while training, a learned threshold at inference) or "jumprelu" (learned per-latent
    threshold, L0 penalty).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        architecture: str = "relu",
        k: int | None = None,
        l1_coefficient: float = 1e-3,
        auxk_coefficient: float = 1 / 32,
        k_aux: int | None = None,
        jumprelu_bandwidth: float = 1e-3,
        jumprelu_init_threshold: float = 1e-3,
        normalize_decoder: bool | None = None,
        batchtopk_threshold_momentum: float = 0.99,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        if k is None and architecture in ("topk", "batchtopk"):
            raise ValueError(f"architecture {architecture!r} needs k (number of active latents per token)")
        if k is not None and not 1 <= k <= d_sae:
            raise ValueError(f"k={k} is out of range; it must be between 1 and d_sae={d_sae}")
        # Gao et al. 2024, appendix A.2: k_aux = d_in / 2.
        k_aux = max(1, d_in // 2) if k_aux is None else k_aux
        if k_aux < 1:
            raise ValueError(f"k_aux={k_aux} must be at least 1")
        if jumprelu_bandwidth <= 0 or jumprelu_init_threshold <= 0:
            raise ValueError(
                f"jumprelu_bandwidth={jumprelu_bandwidth} and jumprelu_init_threshold={jumprelu_init_threshold} "
                "must both be positive"
            )
        if not 0 <= batchtopk_threshold_momentum <= 1:
            raise ValueError(f"batchtopk_threshold_momentum={batchtopk_threshold_momentum} must be in [0, 1]")

        self.d_in, self.d_sae, self.architecture, self.k = d_in, d_sae, architecture, k
        self.l1_coefficient, self.auxk_coefficient, self.k_aux = l1_coefficient, auxk_coefficient, k_aux
        self.jumprelu_bandwidth, self.jumprelu_init_threshold = jumprelu_bandwidth, jumprelu_init_threshold
        self.batchtopk_threshold_momentum = batchtopk_threshold_momentum
        # JumpReLU trains with an L0 penalty, which a decoder norm cannot game, so it needs no constraint.
        self.normalize_decoder = architecture != "jumprelu" if normalize_decoder is None else normalize_decoder

        self.W_enc = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((d_sae,), float(jumprelu_init_threshold)).log())
        if architecture == "batchtopk":
            # -1 means "not estimated yet": eval falls back to per-token TopK until a training batch has been seen.
            self.register_buffer("threshold", torch.tensor(-1.0))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows, encoder tied to them, zero biases (draws from torch's global RNG)."""
        nn.init.kaiming_uniform_(self.W_dec)
        self.normalize_decoder_()
        # Tied init (Anthropic, April 2024 update; Gao et al. 2024, section 2.4) starts every latent live.
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, architecture={self.architecture!r}, k={self.k}"

    def _pre_acts(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    def _activate(self, pre_acts: Tensor, update_threshold: bool = False) -> Tensor:
        if self.architecture == "relu":
            return F.relu(pre_acts)
        if self.architecture == "jumprelu":
            return _JumpReLU.apply(pre_acts, self.log_threshold.exp(), self.jumprelu_bandwidth)
        if self.architecture == "batchtopk":
            if self.training:
                return self._batch_topk(pre_acts, update_threshold)
            if self.threshold >= 0:
                return pre_acts * (pre_acts > self.threshold)
        return _row_topk(pre_acts, self.k)

    def _batch_topk(self, pre_acts: Tensor, update_threshold: bool) -> Tensor:
        # Bussmann et al. 2024: k * batch latents over the whole batch, so tokens can use more or fewer than k.
        flat = F.relu(pre_acts).flatten()
        values, indices = flat.topk(self.k * pre_acts.shape[0], sorted=False)
        if update_threshold:
            with torch.no_grad():
                # The smallest kept positive activation, tracked as an EMA, replaces the batch dependence at
                # inference. Written without .item() so it does not stall the GPU.
                batch_min = torch.where(values > 0, values, torch.inf).min().to(self.threshold.dtype)
                m = self.batchtopk_threshold_momentum
                ema = torch.where(self.threshold < 0, batch_min, m * self.threshold + (1 - m) * batch_min)
                self.threshold.copy_(torch.where(batch_min.isfinite(), ema, self.threshold))
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_acts)

    def encode(self, x: Tensor) -> Tensor:
        """Latents (..., d_sae) of x (..., d_in). Does not update the batchtopk threshold; in eval mode batchtopk
        keeps the latents above it."""
        self._check_input(x)
        pre_acts = self._pre_acts(x.reshape(-1, self.d_in))
        return self._activate(pre_acts).view(*x.shape[:-1], self.d_sae)

    def decode(self, latents: Tensor) -> Tensor:
        """Reconstruction (..., d_in) of latents (..., d_sae)."""
        return latents @ self.W_dec + self.b_dec

    def _decode_sparse(self, indices: Tensor, values: Tensor) -> Tensor:
        """sum_j values[:, j] * W_dec[indices[:, j]], (batch, d_in), without b_dec; indices/values (batch, n)."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SaeOutput:
        """Encode, decode and score x (batch, d_in). ``dead_mask`` (d_sae,) bool marks the latents the AuxK loss
        may use (topk and batchtopk); in training mode batchtopk also updates its threshold."""
        self._check_input(x)
        if x.ndim != 2:
            raise ValueError(f"forward takes x of shape (batch, d_in), got {tuple(x.shape)}; flatten tokens first")
        pre_acts = self._pre_acts(x)
        if self.architecture == "topk":
            # Only k of d_sae latents are nonzero: decoding by gathering their rows costs k/d_sae of the dense
            # product, forward and backward (Gao et al. 2024 use a sparse kernel for the same reason).
            values, indices = pre_acts.topk(self.k, dim=-1, sorted=False)
            values = F.relu(values)
            latents = torch.zeros_like(pre_acts).scatter(-1, indices, values)
            x_hat = self._decode_sparse(indices, values) + self.b_dec
        else:
            latents = self._activate(pre_acts, update_threshold=self.training)
            x_hat = self.decode(latents)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        sparsity = self._sparsity(pre_acts, latents)
        auxk = self._auxk(x, x_hat, pre_acts, dead_mask)
        return SaeOutput(x_hat, latents, pre_acts, mse, sparsity, auxk, mse + sparsity + auxk)

    def _sparsity(self, pre_acts: Tensor, latents: Tensor) -> Tensor:
        if self.architecture == "relu":
            l1 = latents.abs()
            if not self.normalize_decoder:
                # Anthropic, April 2024 update: without the unit-norm constraint the L1 must see decoder norms, or
                # the SAE shrinks f and grows W_dec for free.
                l1 = l1 * self.W_dec.norm(dim=1)
            return self.l1_coefficient * l1.sum(-1).mean()
        if self.architecture == "jumprelu":
            l0 = _Step.apply(pre_acts, self.log_threshold.exp(), self.jumprelu_bandwidth)
            return self.l1_coefficient * l0.sum(-1).mean()
        return pre_acts.new_zeros(())

    def _auxk(self, x: Tensor, x_hat: Tensor, pre_acts: Tensor, dead_mask: Tensor | None) -> Tensor:
        zero = pre_acts.new_zeros(())
        if dead_mask is None or self.architecture not in ("topk", "batchtopk"):
            return zero
        if dead_mask.shape != (self.d_sae,):
            raise ValueError(f"dead_mask must have shape ({self.d_sae},), got {tuple(dead_mask.shape)}")
        dead_mask = dead_mask.to(device=pre_acts.device, dtype=torch.bool)
        n_dead = int(dead_mask.sum())  # topk needs a Python int
        if n_dead == 0:
            return zero
        # Gao et al. 2024, section A.2: the top k_aux dead latents model the main reconstruction's residual,
        # giving dead latents a gradient that points where live ones fall short.
        values, indices = pre_acts.masked_fill(~dead_mask, float("-inf")).topk(min(self.k_aux, n_dead), dim=-1)
        residual = x - x_hat.detach()
        error = (residual - self._decode_sparse(indices, F.relu(values))).pow(2).sum(-1).mean()
        # Normalised like OpenAI's normalized MSE, so auxk_coefficient does not depend on the residual's scale.
        # A residual with no variance (e.g. a batch of one) gives nothing to normalise by: the loss is 0 there,
        # with a safe denominator so that the unused branch's gradient is not NaN.
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        has_variance = variance > 0
        normalised = error / torch.where(has_variance, variance, torch.ones_like(variance))
        return self.auxk_coefficient * torch.where(has_variance, normalised, zero)

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension; this SAE has d_in={self.d_in}")

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every row of W_dec to unit norm (Towards Monosemanticity: after each optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out of W_dec.grad the part parallel to each row (Towards Monosemanticity: before the step), so
        the step does not spend itself on a norm that ``normalize_decoder_`` would undo."""
        if self.W_dec.grad is None:
            return
        direction = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny)
        self.W_dec.grad.sub_((self.W_dec.grad * direction).sum(1, keepdim=True) * direction)
