"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK sparse autoencoders"): k * batch latents over the whole batch
while training, a learned global threshold at inference."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from neurolight.lightning_modules.sae.architectures.base import Architecture, ResampleReset
from neurolight.lightning_modules.sae.architectures.selection import topk
from neurolight.lightning_modules.sae.architectures.sparse_encoder import gather_pre_acts_at, latent_order
from neurolight.lightning_modules.sae.architectures.topk import TopK, row_topk


class BatchTopK(TopK):
    """f keeps the k * batch largest pre-activations of the batch, so tokens use more or fewer than k; at inference
    the latents above a running estimate of the smallest kept activation (buffer ``threshold``)."""

    def __init__(
        self,
        k: int = 32,
        auxk_coefficient: float = 1 / 32,
        k_aux: int | None = None,
        threshold_momentum: float = 0.99,
        encoder_init_scale: float | None = None,
        decoder_init_norm: float | None = None,
    ) -> None:
        """
        Args:
            k: Mean latents active per token over a batch; lower it for a lower L0 (Bussmann et al. 2024 train at
                k = 32 among others).
            auxk_coefficient: Weight of the AuxK loss on dead latents (Gao et al. 2024, appendix A.2: 1/32).
            k_aux: Dead latents the AuxK loss uses per token; default d_in / 2.
            threshold_momentum: Momentum of the exponential moving average of the smallest kept activation, the
                threshold used at inference.
            encoder_init_scale: The encoder starts as this multiple of the unit-norm decoder; None: the
                least-squares multiple, as for TopK (docs/sae.md, Initialisation). 1.0: W_enc = W_dec.
            decoder_init_norm: None: unit-norm decoder rows; a norm: free rows started there, as for TopK
                (docs/sae.md, Free decoder norms).
        """
        super().__init__(k, auxk_coefficient, k_aux, encoder_init_scale, decoder_init_norm)
        if not 0 <= threshold_momentum <= 1:
            raise ValueError(f"threshold_momentum={threshold_momentum} must be in [0, 1]")
        self.threshold_momentum = threshold_momentum

    def tensors(self, d_in: int, d_sae: int) -> dict[str, Tensor]:
        # -1 means "not estimated yet": inference falls back to per-token TopK until a training batch has been seen.
        return {"threshold": torch.tensor(-1.0)}

    def inference_threshold(self, sae) -> Tensor | None:
        return sae.threshold if sae.threshold >= 0 else None

    def activation(self, sae, pre_acts: Tensor, update: bool) -> Tensor:
        if not sae.training:
            return row_topk(pre_acts, self.k)  # no threshold estimated yet
        values, indices = self.batch_topk(sae, pre_acts, update)
        return torch.zeros_like(pre_acts).flatten().scatter_(0, indices, values).view_as(pre_acts)

    def batch_topk(self, sae, pre_acts: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        """The k * batch largest of relu(pre_acts) over the whole batch: their values and flat indices into
        (batch, d_sae); with ``update``, the threshold's moving average takes in the smallest positive one."""
        flat = F.relu(pre_acts).flatten()
        values, indices = topk(flat, self.k * pre_acts.shape[0])
        if update:
            with torch.no_grad():
                # The smallest kept positive activation, tracked as an EMA, replaces the batch dependence at
                # inference. Written without .item() so it does not stall the GPU.
                threshold = sae.threshold
                batch_min = torch.where(values > 0, values, torch.inf).min().to(threshold.dtype)
                m = self.threshold_momentum
                ema = torch.where(threshold < 0, batch_min, m * threshold + (1 - m) * batch_min)
                threshold.copy_(torch.where(batch_min.isfinite(), ema, threshold))
        return values, indices

    def encode_decode(self, sae, x: Tensor, pre_acts: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        if not sae.training:  # the threshold (or per-token TopK before one exists): dense
            return Architecture.encode_decode(self, sae, x, pre_acts, update)
        # k * batch entries of d_sae * batch are nonzero, as in TopK (whose encode_decode says why this pays):
        # the encoder's backward touches only those (sparse_encoder), and each token decodes its own entries, any
        # number of them, as one bag of decoder rows.
        _, indices = self.batch_topk(sae, pre_acts.detach(), update)
        # Flat indices in ascending order are the entries token by token, as the decode's bags need them.
        indices = indices.sort().values
        rows, cols = indices.div(sae.d_sae, rounding_mode="floor"), indices % sae.d_sae
        by_latent = latent_order(cols, sae.d_sae)  # sorted once for both backwards
        values = F.relu(gather_pre_acts_at(sae, x, pre_acts, rows, cols, rows_sorted=True, by_latent=by_latent))
        latents = torch.zeros_like(pre_acts).index_put((rows, cols), values)
        counts = torch.zeros_like(rows[: len(x)]).index_add_(0, rows, torch.ones_like(rows))  # no host sync
        x_hat = sae.decode_sparse(cols, values, offsets=counts.cumsum(0) - counts, by_latent=by_latent)
        return latents, x_hat + sae.b_dec

    def resample_resets(self) -> list[ResampleReset]:
        # The estimate describes the activations before resampling; the next training batch estimates it afresh.
        return [ResampleReset("threshold", -1.0)]
