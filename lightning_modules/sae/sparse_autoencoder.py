"""Sparse autoencoders for dictionary learning on LLM activations; the architecture (ReLU, TopK, BatchTopK, JumpReLU,
...) is a settings object from ``neurolight.lightning_modules.sae.architectures``.

A plain ``nn.Module`` (no Lightning), so a trained SAE loads and runs on its own::

    sae = SparseAutoencoder(d_in=576, d_sae=576 * 16, architecture=TopK(k=32))
    out = sae(x, dead_mask=dead)  # SaeOutput(x_hat, latents, pre_acts, mse, reconstruction, sparsity, aux, loss)
    out.loss.backward()

``from_pretrained`` reads one from a neurolight checkpoint or directory, or from SAELens's or sparsify's format;
``save_pretrained`` writes those directories (docs/sae.md, Formats).

Sources: Bricken et al. 2023 "Towards Monosemanticity" (ReLU + L1, unit-norm decoder); Anthropic circuits update,
April 2024 (tied init); the architectures' own files cite theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from neurolight.lightning_modules.sae.architectures import (
    Architecture,
    architecture_config,
    build_architecture,
    remove_parallel_component,
    unit_norm_rows,
)
from neurolight.lightning_modules.sae.architectures.base import UNIT_NORM_EPS
from neurolight.lightning_modules.sae.architectures.sparse_decoder import decode_entries
from neurolight.lightning_modules.sae.metadata import SaeMetadata


class SaeOutput(NamedTuple):
    """What ``SparseAutoencoder.forward`` returns; every loss term is already multiplied by its coefficient."""

    x_hat: Tensor
    """(batch, d_in) reconstruction."""
    latents: Tensor
    """(batch, d_sae) codes after the activation; a latent fires where it is > 0."""
    pre_acts: Tensor
    """(batch, d_sae) encoder pre-activations."""
    mse: Tensor
    """Scalar: squared error of ``x_hat`` summed over d_in, mean over batch."""
    reconstruction: Tensor
    """Scalar: the reconstruction term of the loss; ``mse``, except where the architecture reconstructs more than
    once (Matryoshka: the sum over its nested prefixes)."""
    sparsity: Tensor
    """Scalar: the architecture's sparsity penalty (L1 for ReLU, L0 for JumpReLU); 0 for the TopK family."""
    aux: Tensor
    """Scalar: the architecture's auxiliary loss (AuxK on the dead latents for the TopK family); else 0."""
    loss: Tensor
    """Scalar: reconstruction + sparsity + aux."""


class SparseAutoencoder(nn.Module):
    """x_hat = f(x) @ W_dec + b_dec with f = activation((x - b_dec) @ W_enc.T + b_enc).

    Each row of ``W_enc`` and ``W_dec`` (both (d_sae, d_in)) belongs to one latent. ``architecture`` sets the
    activation, the loss terms and the decoder constraint; the tensors it needs (JumpReLU's ``log_threshold``,
    BatchTopK's ``threshold``) are registered here, under their names.
    """

    def __init__(self, d_in: int, d_sae: int, architecture: Architecture | str | Mapping = "topk") -> None:
        """
        Args:
            d_in: Width of the input activations.
            d_sae: Number of latents.
            architecture: An ``Architecture`` (e.g. ``TopK(k=32)``), a registered name with default settings
                (``"relu"``), or a checkpoint's ``{"class_path", "init_args"}``.
        """
        super().__init__()
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        self.d_in, self.d_sae = d_in, d_sae
        self.metadata = SaeMetadata()
        self.architecture = build_architecture(architecture)
        self.architecture.check(d_in, d_sae)

        self.W_enc = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        for name, tensor in self.architecture.tensors(d_in, d_sae).items():
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor)
        self.expects_scaled_input = False
        """True for the SAE a ``SparseAutoencoderModule`` trains with input normalisation: its weights take the
        scaled activations, so ``save_pretrained`` refuses it (the module's own ``save_pretrained`` folds the scale)."""
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------ formats
    @classmethod
    def from_pretrained(cls, source: str | Path, name: str | None = None) -> SparseAutoencoder:
        """An SAE from ``source``, working on RAW activations (any training normalisation folded in), in eval mode:

        - a neurolight checkpoint (``.ckpt`` of ``neurolight fit``); of a sweep's, the SAE called ``name``;
        - a directory written by ``save_pretrained`` in any format: neurolight's, SAELens's (``cfg.json`` +
          ``sae_weights.safetensors``; standard, topk, batchtopk, jumprelu) or sparsify's (``cfg.json`` +
          ``sae.safetensors``; TopK).

        ``.metadata`` says where it reads (model, site, layer), its data settings and the source format.
        """
        from neurolight.lightning_modules.sae.formats import load_sae

        return load_sae(source, name)

    def save_pretrained(
        self, directory: str | Path, format: str = "neurolight", firing_frequency: Tensor | None = None
    ) -> list[Path]:
        """Write this SAE (raw activation space, as ``from_pretrained`` returns it) into ``directory`` as
        ``neurolight``, ``saelens`` or ``sparsify``; a format that cannot represent the architecture is refused with
        the formats that can. ``firing_frequency`` (d_sae,) goes to SAELens's ``sparsity.safetensors`` (log10) or
        neurolight's ``firing_frequency.safetensors``. Returns the files written."""
        from neurolight.lightning_modules.sae.formats import save_sae

        if self.expects_scaled_input:
            raise ValueError(
                "this SAE belongs to a SparseAutoencoderModule and works on its normalised activations (x times the "
                "module's activation_scale); export it with module.save_pretrained(directory, format), which folds "
                "the scale into the weights (or SparseAutoencoder.from_pretrained(checkpoint).save_pretrained(...))"
            )
        return save_sae(self, directory, format, firing_frequency)

    @property
    def normalize_decoder(self) -> bool:
        """Whether decoder rows are kept at unit norm (the architecture's decoder constraint)."""
        return self.architecture.normalize_decoder

    @property
    def free_decoder_norms(self) -> bool:
        """Whether decoder rows are free and the latents selected on and scaled by their norms (the architecture's
        ``decoder_init_norm``; docs/sae.md, Free decoder norms)."""
        return getattr(self.architecture, "decoder_init_norm", None) is not None

    def encoder_weights(self) -> tuple[Tensor, Tensor]:
        """``(W_enc, b_enc)`` as the forward uses them: the parameters, or with free decoder norms n (d_sae,) the
        parameters times n (SAELens multiplies the pre-activations by n: the same product), differentiable in W_dec."""
        if not self.free_decoder_norms:
            return self.W_enc, self.b_enc
        norms = self.W_dec.norm(dim=1)
        return self.W_enc * norms.unsqueeze(1), self.b_enc * norms

    def decoder_weight(self) -> Tensor:
        """``W_dec`` (d_sae, d_in) as the forward uses it: the parameter, or with free decoder norms its rows divided
        by their norms (SAELens divides the latents by them: the same product)."""
        if not self.free_decoder_norms:
            return self.W_dec
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(UNIT_NORM_EPS)

    def with_unit_decoder(self) -> SparseAutoencoder:
        """This SAE with free decoder norms folded into the weights (``encoder_weights``, ``decoder_weight``) and the
        architecture's ``decoder_init_norm`` None: the same reconstruction and latents from unit-norm rows, which is
        what SAELens's and sparsify's formats hold. Itself where the rows are already constrained."""
        if not self.free_decoder_norms:
            return self
        config = architecture_config(self.architecture)
        config["init_args"] = {**config["init_args"], "decoder_init_norm": None}
        folded = SparseAutoencoder(self.d_in, self.d_sae, config).to(self.W_dec)
        with torch.no_grad():
            W_enc, b_enc = self.encoder_weights()
            state = {**self.state_dict(), "W_enc": W_enc, "b_enc": b_enc, "W_dec": self.decoder_weight()}
            folded.load_state_dict(state)
        folded.metadata = self.metadata
        return folded.train(self.training)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows (at ``decoder_init_norm`` where the architecture frees them), encoder tied to
        them (times the architecture's ``tied_encoder_scale``), zero biases (draws the decoder from torch's global
        RNG)."""
        nn.init.kaiming_uniform_(self.W_dec)
        self.normalize_decoder_()
        scale = self.architecture.tied_encoder_scale(self)
        if self.free_decoder_norms:
            # SAELens's decoder_init_norm: Adam's per-element step turns a row of norm 0.1 ~10x further than a unit one;
            # the encoder, tied to the short rows, starts as short (SAELens's init at scale 1).
            self.W_dec.mul_(self.architecture.decoder_init_norm)
        # Tied init (Anthropic, April 2024 update; Gao et al. 2024, section 2.4) starts every latent live.
        self.W_enc.copy_(self.W_dec * scale)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, architecture={self.architecture!r}"

    def _pre_acts(self, x: Tensor) -> Tensor:
        W_enc, b_enc = self.encoder_weights()
        product = (x - self.b_dec) @ W_enc.T
        if product.dtype == b_enc.dtype:
            return product + b_enc
        # Under autocast the product is bf16 and b_enc float32: cast first and add in place, the same sum, because on
        # CPU the out-of-place mixed add cast into a temporary of its own (1.7 against 0.9 ms at 512 x 2304).
        return product.to(b_enc.dtype).add_(b_enc)

    def activate(self, pre_acts: Tensor, update: bool = False) -> Tensor:
        """Latents (batch, d_sae) of pre_acts: the architecture's training rule, or at inference its threshold
        where it has one. ``update`` (a training forward) lets the architecture move its running estimates."""
        if not self.training:
            threshold = self.architecture.inference_threshold(self)
            if threshold is not None:
                return pre_acts * (pre_acts > threshold)
        return self.architecture.activation(self, pre_acts, update)

    def encode(self, x: Tensor) -> Tensor:
        """Latents (..., d_sae) of x (..., d_in). Never updates running estimates (BatchTopK's threshold)."""
        self._check_input(x)
        pre_acts = self._pre_acts(x.reshape(-1, self.d_in))
        return self.activate(pre_acts).view(*x.shape[:-1], self.d_sae)

    def decode(self, latents: Tensor) -> Tensor:
        """Reconstruction (..., d_in) of latents (..., d_sae)."""
        return latents @ self.decoder_weight() + self.b_dec

    def decode_sparse(
        self,
        indices: Tensor,
        values: Tensor,
        offsets: Tensor | None = None,
        by_latent: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """sum_j values[:, j] * W_dec[indices[:, j]], (batch, d_in), without b_dec; indices/values (batch, n). With
        ``offsets`` (batch,), indices/values are 1-D and token b's entries start at ``offsets[b]`` (any number).
        ``by_latent``: the flat indices' ``sparse_encoder.latent_order``, where the caller has it already."""
        if offsets is None:
            batch, n = indices.shape
            indices, values = indices.reshape(-1), values.reshape(-1)
            offsets = torch.arange(0, batch * n, n, device=indices.device)
        return decode_entries(self.decoder_weight(), indices, values.to(self.W_dec.dtype), offsets, by_latent)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SaeOutput:
        """Encode, decode and score x (batch, d_in). ``dead_mask`` (d_sae,) bool marks the latents the auxiliary
        loss may use (AuxK); in training mode the architecture may update its running estimates."""
        self._check_input(x)
        if x.ndim != 2:
            raise ValueError(f"forward takes x of shape (batch, d_in), got {tuple(x.shape)}; flatten tokens first")
        pre_acts = self._pre_acts(x)
        latents, x_hat = self.architecture.encode_decode(self, x, pre_acts, update=self.training)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        reconstruction = self.architecture.reconstruction_loss(self, x, latents, mse)
        sparsity = self.architecture.sparsity_loss(self, pre_acts, latents)
        if dead_mask is None:
            aux = pre_acts.new_zeros(())
        else:
            if dead_mask.shape != (self.d_sae,):
                raise ValueError(f"dead_mask must have shape ({self.d_sae},), got {tuple(dead_mask.shape)}")
            dead = dead_mask.to(device=pre_acts.device, dtype=torch.bool)
            aux = self.architecture.aux_loss(self, x, x_hat, pre_acts, dead)
        return SaeOutput(x_hat, latents, pre_acts, mse, reconstruction, sparsity, aux, reconstruction + sparsity + aux)

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension; this SAE has d_in={self.d_in}")

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every row of W_dec to unit norm (Towards Monosemanticity: after each optimizer step)."""
        self.W_dec.copy_(unit_norm_rows(self.W_dec))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out of W_dec.grad the part parallel to each row (Towards Monosemanticity: before the step), so
        the step does not spend itself on a norm that ``normalize_decoder_`` would undo."""
        if self.W_dec.grad is not None:
            self.W_dec.grad.copy_(remove_parallel_component(self.W_dec.grad, self.W_dec))
