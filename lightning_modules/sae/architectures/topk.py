"""TopK SAE with the AuxK loss on dead latents (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from neurolight.lightning_modules.sae.architectures.base import Architecture
from neurolight.lightning_modules.sae.architectures.selection import topk
from neurolight.lightning_modules.sae.architectures.sparse_encoder import gather_pre_acts, latent_order


def row_topk(pre_acts: Tensor, k: int) -> Tensor:
    """ReLU of the k largest pre-activations of each row, zero elsewhere; (batch, d_sae)."""
    values, indices = topk(pre_acts, k)
    return torch.zeros_like(pre_acts).scatter_(-1, indices, F.relu(values))


@torch.no_grad()
def least_squares_encoder_scale(sae, probes: int = 256, seed: int = 0) -> float:
    """The c > 0 that minimises sum ||u - c x_hat(u)||^2 over ``probes`` random unit-norm inputs u, x_hat(u) being the
    reconstruction with the encoder tied to the decoder (W_enc = W_dec, biases 0): c = sum <u, x_hat> / sum ||x_hat||^2.

    With W_enc = c W_dec the reconstruction is c x_hat(u) for an activation that commutes with scaling by c > 0
    (ReLU, TopK, BatchTopK: the same latents are kept). The probes come from a generator of their own, so the global
    RNG (the next SAE's initialisation, the data order) does not move; they go through in chunks of 64, so the
    pre-activations of a wide SAE stay small."""
    weight = sae.W_dec.detach().float()
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    u = torch.randn(probes, sae.d_in, generator=generator, device=weight.device)
    u = u / u.norm(dim=1, keepdim=True)
    along, length = 0.0, 0.0
    for chunk in u.split(64):
        x_hat = sae.architecture.activation(sae, chunk @ weight.T, update=False) @ weight
        along, length = along + float((chunk * x_hat).sum()), length + float(x_hat.pow(2).sum())
    return along / length if along > 0 and length > 0 else 1.0


class TopK(Architecture):
    """f = ReLU of the k largest pre-activations of each token; L0 <= k by construction."""

    sparsity_setting = "k"
    raise_for_sparsity = False

    def __init__(
        self,
        k: int = 32,
        auxk_coefficient: float = 1 / 32,
        k_aux: int | None = None,
        encoder_init_scale: float | None = None,
        decoder_init_norm: float | None = None,
    ) -> None:
        """
        Args:
            k: Latents kept active per token; lower it for a lower L0. Gao et al. 2024 train most of their SAEs
                at k = 32.
            auxk_coefficient: Weight of the AuxK loss, which lets dead latents model the reconstruction's residual
                (Gao et al. 2024, appendix A.2: 1/32), relative to the reconstruction loss divided by the batch's
                input variance, as in their code (docs/sae.md, TopK).
            k_aux: Dead latents the AuxK loss uses per token; default d_in / 2 (Gao et al. 2024, appendix A.2).
            encoder_init_scale: The encoder starts as this multiple of the unit-norm decoder (tied initialisation).
                None: the multiple that best reconstructs random unit-norm inputs at initialisation (least squares;
                0.81 at k = 16 and 0.46 at k = 128 for d_in = 576, d_sae = 4608), so that a large k does not start
                from reconstructions longer than their inputs (docs/sae.md, Initialisation). 1.0: W_enc = W_dec.
            decoder_init_norm: None: decoder rows kept at unit norm. A norm (SAELens: 0.1): rows free, started at
                this norm, latents selected on and scaled by the row norms (SAELens's rescale_acts_by_decoder_norm),
                so that Adam turns small rows faster (docs/sae.md, Free decoder norms).
        """
        if k < 1:
            raise ValueError(f"k={k} must be at least 1")
        if k_aux is not None and k_aux < 1:
            raise ValueError(f"k_aux={k_aux} must be at least 1")
        if encoder_init_scale is not None and not encoder_init_scale > 0:
            raise ValueError(
                f"encoder_init_scale={encoder_init_scale} must be positive, or None for the least-squares one"
            )
        self.k, self.auxk_coefficient, self.k_aux = k, auxk_coefficient, k_aux
        self.encoder_init_scale = encoder_init_scale
        if decoder_init_norm is not None and not decoder_init_norm > 0:
            raise ValueError(f"decoder_init_norm={decoder_init_norm} must be positive, or None for unit-norm rows")
        self.decoder_init_norm = decoder_init_norm
        self.normalize_decoder = decoder_init_norm is None

    def check(self, d_in: int, d_sae: int) -> None:
        if self.k > d_sae:
            raise ValueError(f"k={self.k} is out of range; it must be between 1 and d_sae={d_sae}")

    def default_decoder_lr_multiplier(self) -> float:
        # The unit-norm decoder's directions turn at most about lr * sqrt(d_in) a step; twice that matched or beat
        # 1 in every measured run: TopK and BatchTopK on SmolLM2's layers 8 and 15, Matryoshka on layer 15
        # (docs/sae.md, Decoder learning rate). Free rows (decoder_init_norm) already turn faster when short: 1.
        return 2.0 if self.normalize_decoder else 1.0

    def tied_encoder_scale(self, sae) -> float:
        # Gao et al. 2024's released code scales the tied encoder at init so that random unit-norm inputs give
        # reconstructions of unit mean norm; the least-squares scale, which also discounts the part of the
        # reconstruction that is not along the input, trained better at k = 16 and 128 (docs/sae.md, Initialisation).
        if self.encoder_init_scale is not None:
            return self.encoder_init_scale
        return least_squares_encoder_scale(sae)

    def activation(self, sae, pre_acts: Tensor, update: bool) -> Tensor:
        return row_topk(pre_acts, self.k)

    def encode_decode(self, sae, x: Tensor, pre_acts: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        # Only k of d_sae latents are nonzero: decoding by gathering their rows, and the encoder's backward by
        # touching only theirs, costs k/d_sae of the dense products (Gao et al. 2024 use sparse kernels for the
        # same reason).
        _, indices = topk(pre_acts.detach(), self.k)
        by_latent = latent_order(indices.reshape(-1), sae.d_sae)  # sorted once for both backwards
        values = F.relu(gather_pre_acts(sae, x, pre_acts, indices, by_latent))
        # In place into fresh zeros: the out-of-place scatter copies the (batch, d_sae) zeros once more.
        latents = torch.zeros_like(pre_acts).scatter_(-1, indices, values)
        return latents, sae.decode_sparse(indices, values, by_latent=by_latent) + sae.b_dec

    def aux_loss(self, sae, x: Tensor, x_hat: Tensor, pre_acts: Tensor, dead: Tensor) -> Tensor:
        zero = pre_acts.new_zeros(())
        n_dead = int(dead.sum())  # topk needs a Python int
        if n_dead == 0:
            return zero
        k_aux = max(1, sae.d_in // 2) if self.k_aux is None else self.k_aux
        # Gao et al. 2024, section A.2: the top k_aux dead latents model the main reconstruction's residual,
        # giving dead latents a gradient that points where live ones fall short.
        _, indices = topk(pre_acts.detach().masked_fill(~dead, float("-inf")), min(k_aux, n_dead))
        by_latent = latent_order(indices.reshape(-1), sae.d_sae)
        values = F.relu(gather_pre_acts(sae, x, pre_acts, indices, by_latent))
        residual = x - x_hat.detach()
        error = (residual - sae.decode_sparse(indices, values, by_latent=by_latent)).pow(2).sum(-1).mean()
        # Normalised like OpenAI's normalized MSE, so auxk_coefficient does not depend on the residual's scale.
        # A residual with no variance (e.g. a batch of one) gives nothing to normalise by: the loss is 0 there,
        # with a safe denominator so that the unused branch's gradient is not NaN.
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        has_variance = variance > 0
        normalised = error / torch.where(has_variance, variance, torch.ones_like(variance))
        # Gao et al.'s code divides the main loss by the input's variance and this one does not: times that variance,
        # AuxK keeps the weight against the main loss that alpha = 1/32 has there (docs/sae.md, TopK).
        input_variance = (x - x.mean(0)).pow(2).sum(-1).mean().detach()
        return self.auxk_coefficient * input_variance * torch.where(has_variance, normalised, zero)
