"""SparseAutoencoderModule: trains a SparseAutoencoder on the activations an ActivationDataModule serves.

neurolight fit --config configs/sae/demo.yaml
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor

from neurolight.datamodules.llm import zero
from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder


class SparseAutoencoderModule(pl.LightningModule):
    def __init__(
        self,
        act_vec_size: int,
        dict_vec_size: int,
        architecture: str = "relu",
        k: int | None = None,
        l1_coefficient: float = 1e-3,
        learning_rate: float = 2e-4,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        lr_warmup_steps: int = 0,
        auxk_coefficient: float = 1 / 32,
        k_aux: int | None = None,
        dead_tokens_threshold: int = 10_000_000,
        dense_log_freq: float = -1.0,
        normalize_dataset: bool = True,
        metrics_every_n_steps: int = 50,
    ) -> None:
        """
        Args:
            act_vec_size: Width of the hooked activation (d_in); checked against the LLM at setup.
            dict_vec_size: Number of latents (d_sae).
            architecture: ``relu`` (L1 penalty), ``topk``, ``batchtopk`` or ``jumprelu``.
            k: Active latents per token for ``topk`` / ``batchtopk`` (per token on average for batchtopk).
            l1_coefficient: Sparsity coefficient: L1 for ``relu``, L0 for ``jumprelu``.
            learning_rate: Adam learning rate.
            adam_betas: Adam betas.
            lr_warmup_steps: Linear learning-rate warm-up steps (0: none).
            auxk_coefficient: Weight of the AuxK loss on dead latents (TopK/BatchTopK; Gao et al. use 1/32).
            k_aux: Dead latents used by AuxK; default d_in / 2.
            dead_tokens_threshold: A latent is dead when it has not fired for this many tokens (Gao et al.: 10M).
            dense_log_freq: A latent is dense when log10 of its firing frequency over a metrics window exceeds this.
            normalize_dataset: Scale activations by one scalar, estimated once on the first buffer so that
                E||x|| = sqrt(d_in); it is stored in the checkpoint (buffer ``activation_scale``).
            metrics_every_n_steps: Steps between logs of L0, explained variance, dead and dense fractions.
        """
        super().__init__()
        self.save_hyperparameters()
        self.sae = SparseAutoencoder(
            act_vec_size,
            dict_vec_size,
            architecture=architecture,
            k=k,
            l1_coefficient=l1_coefficient,
            auxk_coefficient=auxk_coefficient,
            k_aux=k_aux,
        )
        self.register_buffer("activation_scale", torch.tensor(math.nan if normalize_dataset else 1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(dict_vec_size, dtype=torch.long))
        self.register_buffer("window_fired", torch.zeros(dict_vec_size, dtype=torch.long))
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------------------------- normalisation
    def normalize(self, activations: Tensor) -> Tensor:
        """Raw LLM activations -> the SAE's input space."""
        return activations.to(self.sae.W_enc.dtype) * self.activation_scale.to(self.sae.W_enc.dtype)

    def reconstruct(self, activations: Tensor) -> Tensor:
        """Raw activations (..., d_in) -> their reconstruction in the raw space (for splicing into the LLM)."""
        flat = self.normalize(activations.reshape(-1, activations.shape[-1]))
        return (self.sae(flat).x_hat / self.activation_scale).reshape(activations.shape)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        d_in = getattr(datamodule, "d_in", None)
        if d_in is not None and d_in != self.hparams.act_vec_size:
            raise ValueError(
                f"the LLM's activations at the hook point have d_in={d_in}, but the SAE expects "
                f"act_vec_size={self.hparams.act_vec_size}; set model.init_args.act_vec_size: {d_in}"
            )

    def on_train_start(self) -> None:
        if not torch.isnan(self.activation_scale):
            return  # estimated in an earlier run and restored from the checkpoint
        norm = torch.tensor(self.trainer.datamodule.mean_activation_norm(), device=self.device)
        norm = self.trainer.strategy.reduce(norm, reduce_op="mean")
        self.activation_scale.fill_(math.sqrt(self.hparams.act_vec_size) / norm.item())

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Tensor, batch_idx: int) -> dict:
        x = self.normalize(batch)
        dead = self.tokens_since_fired >= self.hparams.dead_tokens_threshold
        out = self.sae(x, dead_mask=dead)
        fired, num_tokens = (out.latents > 0).sum(0), len(x)
        if self.trainer.world_size > 1:
            # Firing counts over all ranks, so every rank (and every callback) agrees on which latents are dead.
            fired = self.trainer.strategy.reduce(fired.float(), reduce_op="sum").long()
            num_tokens *= self.trainer.world_size
        with torch.no_grad():
            self.tokens_since_fired += num_tokens
            # masked_fill_, not boolean indexing: indexing needs the number of hits on the host (a CUDA sync).
            self.tokens_since_fired.masked_fill_(fired > 0, 0)
            self.window_fired += fired
            self.window_tokens += num_tokens
        step = self.global_step + 1
        log_every = self.trainer.log_every_n_steps
        # Lightning writes step values only every log_every_n_steps; recording them on the other steps is pure
        # per-step overhead, which dominates when the SAE step is a few small GPU kernels.
        if log_every and step % log_every == 0:
            self.log_dict(
                {"train/loss": out.loss, "train/mse": out.mse, "train/sparsity": out.sparsity, "train/auxk": out.auxk},
                prog_bar=False,
            )
        if step % self.hparams.metrics_every_n_steps == 0:
            self._log_sparsity_metrics(x, out)
        return {"loss": out.loss, "fired": fired.detach(), "num_tokens": num_tokens}

    @torch.no_grad()
    def _log_sparsity_metrics(self, x: Tensor, out) -> None:
        frequency = self.window_fired.float() / self.window_tokens.clamp_min(1)
        self.log_dict(
            {
                "train/l0": (out.latents > 0).sum(-1).float().mean(),
                "train/explained_variance": explained_variance(x, out.x_hat),
                "train/dead_fraction": (self.tokens_since_fired >= self.hparams.dead_tokens_threshold).float().mean(),
                "train/dense_fraction": (frequency > 10**self.hparams.dense_log_freq).float().mean(),
            },
            prog_bar=True,
            sync_dist=True,
        )
        self.window_fired.zero_()
        self.window_tokens.zero_()

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.sae.normalize_decoder:
            zero.update_grad(self.sae.W_dec, zero.remove_parallel_component)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # After the optimizer step: Towards Monosemanticity keeps decoder rows at unit norm.
        if self.sae.normalize_decoder:
            zero.update_param(self.sae.W_dec, lambda w: w / w.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ---------------------------------------------------------------------------------------- validation
    def validation_step(self, input_ids: Tensor, batch_idx: int) -> None:
        hooked = self.trainer.datamodule.hooked_llm
        skip_first = self.trainer.datamodule.hparams.exclude_first_position
        acts = hooked.harvest(input_ids)
        if skip_first:
            acts = acts[:, 1:]
        x = self.normalize(acts.reshape(-1, acts.shape[-1]).to(self.device))
        out = self.sae(x)
        splice = hooked.splice_metrics(
            input_ids,
            lambda a: self.reconstruct(a.to(self.device)).to(a.device),
            skip_first_position=skip_first,
        )
        metrics = {
            "val/l0": (out.latents > 0).sum(-1).float().mean(),
            "val/explained_variance": explained_variance(x, out.x_hat),
            "val/mse": out.mse,
            "val/ce_loss_recovered": splice["ce_loss_recovered"],
            "val/kl": splice["kl"],
            "val/ce_spliced": splice["ce_spliced"],
            "val/ce_clean": splice["ce_clean"],
        }
        self.log_dict({k: v.to(self.device) for k, v in metrics.items()}, sync_dist=True)

    # ------------------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate, betas=self.hparams.adam_betas)
        if not self.hparams.lr_warmup_steps:
            return optimizer
        warmup = self.hparams.lr_warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - FVU: 1 - ||x - x_hat||^2 / ||x - mean(x)||^2 over the batch (ALGORITHMS.md §3)."""
    residual = (x - x_hat).float().pow(2).sum()
    total = (x - x.mean(0)).float().pow(2).sum()
    return 1 - residual / total
