"""SparseAutoencoderModule: trains a SparseAutoencoder on batches of activations from any DataLoader: the LLM's
(``ActivationDataModule``), an activation cache's (``CachedActivationDataModule``) or a ``TensorDataset``'s.

neurolight fit --config configs/sae/demo.yaml

The module asks its data module, where there is one, only for what it offers (duck-typed): ``site_widths`` (the
width of each site it serves, checked against ``act_vec_size``), ``mean_activation_norm(site)`` (the normalisation
scalar's estimate; else it is estimated from the first training batches) and ``hooked_llm_at(site)`` (validation
splices the reconstruction into the LLM; without one, validation batches are activations and report the
activation-space metrics). A data module that serves several sites yields batches ``{site: activations}``; the
module reads its own ``site`` from them (docs/sae.md, Sweeps over sites).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from neurolight.datamodules.llm import zero
from neurolight.lightning_modules.sae.architectures import (
    Architecture,
    ReLU,
    architecture_config,
    remove_parallel_component_,
    unit_norm_rows_,
)
from neurolight.lightning_modules.sae.checkpoint_args import resume_decoder_lr_multiplier
from neurolight.lightning_modules.sae.metrics import ExplainedVariance, explained_variance, firing_counts
from neurolight.lightning_modules.sae.optim import adam, linear_warmup, parameter_groups
from neurolight.lightning_modules.sae.sparse_autoencoder import SaeOutput, SparseAutoencoder
from neurolight.lightning_modules.sae.trainer_checks import warn_if_never_validated

_DEFAULT_ARCHITECTURE = ReLU()
# What ``training_metrics`` may return; the last two are logged with the metrics window's dead and dense fractions.
TRAINING_METRICS = (
    "train/loss",
    "train/mse",
    "train/sparsity",
    "train/aux",
    "train/reconstruction",
    "train/l0",
    "train/explained_variance",
)
_WINDOW_METRICS = TRAINING_METRICS[-2:]


class SparseAutoencoderModule(pl.LightningModule):
    def __init__(
        self,
        act_vec_size: int,
        dict_vec_size: int,
        architecture: Architecture = _DEFAULT_ARCHITECTURE,
        learning_rate: float = 2e-4,
        decoder_lr_multiplier: float | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        lr_warmup_steps: int = 0,
        dead_tokens_threshold: int = 10_000_000,
        dense_log_freq: float = -1.0,
        normalize_dataset: bool = True,
        metrics_every_n_steps: int = 50,
        max_l0_fraction: float | None = 0.1,
        norm_estimation_batches: int = 8,
        site: str | None = None,
    ) -> None:
        """
        Args:
            act_vec_size: Width of the hooked activation (d_in); checked against the LLM at setup.
            dict_vec_size: Number of latents (d_sae).
            architecture: The SAE architecture and its settings, e.g. ``{class_path: TopK, init_args: {k: 32}}``;
                a bare class name (``TopK``) takes its default settings. The classes are listed below as known
                subclasses; ``neurolight fit --model SparseAutoencoderModule --model.architecture.help TopK``
                lists the settings of one.
            learning_rate: Adam learning rate.
            decoder_lr_multiplier: The decoder weight's learning rate is ``learning_rate`` times this (1: the same
                as every other parameter). Above 1 it speeds up the unit-norm decoder's direction steps. Default
                (None): the architecture's, 2 for TopK, BatchTopK and Matryoshka with a unit-norm decoder, where it
                raised the explained variance at 4096-token steps and in short runs, else 1 (docs/sae.md, Decoder
                learning rate). The checkpoint records the value trained with.
            adam_betas: Adam betas.
            lr_warmup_steps: Linear learning-rate warm-up steps (0: none).
            dead_tokens_threshold: A latent is dead when it has not fired for this many tokens (Gao et al.: 10M).
            dense_log_freq: A latent is dense when log10 of its firing frequency over a metrics window exceeds this.
            normalize_dataset: Scale activations by one scalar, estimated once so that E||x|| = sqrt(d_in) (from the
                data module's ``mean_activation_norm()``: the LLM's first buffer, or the cache's manifest; else from
                the first ``norm_estimation_batches`` training batches); stored in the checkpoint (buffer
                ``activation_scale``).
            metrics_every_n_steps: Steps between logs of L0, explained variance, dead and dense fractions.
            max_l0_fraction: Warn, naming the architecture's sparsity setting, when L0 stays above this fraction of
                d_in: above it in two consecutive metrics windows and down by less than 10% between them (None:
                never). Not for the TopK family, whose L0 is k by construction.
            norm_estimation_batches: Batches the normalisation scalar is estimated from when the data module does
                not provide ``mean_activation_norm()`` (a plain DataLoader): the first ones of a fresh iterator of
                the training DataLoader, read before the first step. Torch's RNG is restored afterwards, so training
                sees the order it would without the estimate, those batches included.
            site: The site this SAE reads where the data module serves several in one batch (its ``sites``), named
                as ``neurolight-harvest`` names them: ``layers.15.mlp_sublayer``. The checkpoint records it as the
                SAE's site. Default: the data module's only site.
        """
        super().__init__()
        if norm_estimation_batches < 1:
            raise ValueError(f"norm_estimation_batches must be >= 1, got {norm_estimation_batches}")
        if decoder_lr_multiplier is not None and not decoder_lr_multiplier > 0:
            raise ValueError(f"decoder_lr_multiplier must be > 0, got {decoder_lr_multiplier}")
        self.sae = SparseAutoencoder(act_vec_size, dict_vec_size, architecture)
        self.sae.expects_scaled_input = normalize_dataset  # its own save_pretrained refuses: see save_pretrained
        # A checkpoint's hyperparameters hold the architecture as its {class_path, init_args} mapping, and the
        # multiplier trained with, not None (LightningCLI saves the config's values, so it is set afterwards).
        architecture = architecture_config(self.sae.architecture)
        self.save_hyperparameters()
        self.decoder_lr_from_default = decoder_lr_multiplier is None
        if decoder_lr_multiplier is None:  # loggers write hparams_initial (hparams.yaml): it gets the number too
            value = self.sae.architecture.default_decoder_lr_multiplier()
            self.hparams.decoder_lr_multiplier = self._hparams_initial.decoder_lr_multiplier = value
        self.register_buffer("activation_scale", torch.tensor(math.nan if normalize_dataset else 1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(dict_vec_size, dtype=torch.long))
        self.register_buffer("window_fired", torch.zeros(dict_vec_size, dtype=torch.long))
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.long))
        self.val_explained_variance = ExplainedVariance()
        self._previous_l0: float | None = None  # L0 of the previous metrics window
        self._warned_dense = False

    def save_pretrained(self, directory, format: str = "neurolight", firing_frequency: Tensor | None = None):
        """Write the SAE for raw activations (the normalisation scalar folded into the weights), in a format of
        ``SparseAutoencoder.save_pretrained``, with the site and settings a checkpoint would record."""
        from neurolight.lightning_modules.sae.formats.checkpoint import raw_space_sae

        return raw_space_sae(self).save_pretrained(directory, format, firing_frequency)

    # ------------------------------------------------------------------------------------- normalisation
    def normalize(self, activations: Tensor) -> Tensor:
        """Raw LLM activations -> the SAE's input space."""
        return activations.to(self.sae.W_enc.dtype) * self.activation_scale.to(self.sae.W_enc.dtype)

    def reconstruct(self, activations: Tensor) -> Tensor:
        """Raw activations (..., d_in) -> their reconstruction in the raw space (for splicing into the LLM)."""
        flat = self.normalize(activations.reshape(-1, activations.shape[-1]))
        return (self.sae(flat).x_hat / self.activation_scale).reshape(activations.shape)

    def activations(self, batch) -> Tensor:
        """This SAE's (n, d_in) activations of a batch: of its ``site`` where the batch maps sites to activations."""
        if isinstance(batch, dict):
            site = self.hparams.site
            if site is None or site not in batch:
                given = "no site is set" if site is None else f"it has no site {site}"
                raise ValueError(
                    f"the batch holds the sites {', '.join(batch)} and {given}; set the SAE's site to one of them"
                )
            batch = batch[site]
        return self.batch_activations(batch)

    @staticmethod
    def batch_activations(batch) -> Tensor:
        """The (n, d_in) activations of a training or validation batch: a tensor (..., d_in), or a one-element
        tuple or list of one (what a DataLoader over a ``TensorDataset`` yields)."""
        if isinstance(batch, (tuple, list)) and len(batch) == 1:
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"SparseAutoencoderModule takes batches of activations (a tensor of shape (n, d_in), or a 1-tuple "
                f"of one as a TensorDataset yields), got {type(batch).__name__}"
            )
        return batch.reshape(-1, batch.shape[-1])

    def _datamodule(self):
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def setup(self, stage: str) -> None:
        datamodule = self._datamodule()
        widths = getattr(datamodule, "site_widths", None)
        if not widths:
            return
        site = self.hparams.site
        if site is None:
            if len(widths) > 1:
                raise ValueError(
                    f"{type(datamodule).__name__} serves the sites {', '.join(widths)}; set "
                    f"{self._settings_path()}site to the one this SAE reads"
                )
            site = next(iter(widths))
        elif site not in widths:
            raise ValueError(
                f"{self._settings_path()}site is {site}, but {type(datamodule).__name__} serves "
                f"{', '.join(widths)}; name one of those, or add {site} to the data module's sites"
            )
        d_in = widths[site]
        if d_in != self.hparams.act_vec_size:
            raise ValueError(
                f"the activations {type(datamodule).__name__} serves at {site} have d_in={d_in}, but the SAE expects "
                f"act_vec_size={self.hparams.act_vec_size}; set {self._settings_path()}act_vec_size: {d_in}"
            )

    def on_train_start(self) -> None:
        warn_if_never_validated(self.trainer)
        if not torch.isnan(self.activation_scale):
            return  # estimated in an earlier run and restored from the checkpoint
        estimate = getattr(self._datamodule(), "mean_activation_norm", None)
        norm = estimate(self.hparams.site) if callable(estimate) else self._mean_norm_of_first_batches()
        norm = self.trainer.strategy.reduce(torch.tensor(float(norm), device=self.device), reduce_op="mean")
        self.activation_scale.fill_(math.sqrt(self.hparams.act_vec_size) / norm.item())

    def _mean_norm_of_first_batches(self) -> float:
        """Mean L2 norm over the first ``norm_estimation_batches`` batches of a fresh iterator of the training
        DataLoader. Torch's global RNG is restored afterwards: a shuffling sampler draws its seed from it."""
        loader = self.trainer.train_dataloader
        total, rows = 0.0, 0
        with torch.random.fork_rng(devices=[]):
            for index, batch in enumerate(loader):
                x = self.activations(batch).float()
                total, rows = total + float(x.norm(dim=1).sum()), rows + len(x)
                if index + 1 == self.hparams.norm_estimation_batches:
                    break
        if rows == 0:
            raise ValueError("the training DataLoader yielded no activations to estimate the normalisation scalar from")
        return total / rows

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Tensor, batch_idx: int) -> dict:
        x = self.normalize(self.activations(batch))
        out = self.sae(x, dead_mask=self.dead_latents())
        fired, num_tokens = firing_counts(out.latents), len(x)
        if self.trainer.world_size > 1:
            # Firing counts over all ranks, so every rank (and every callback) agrees on which latents are dead.
            fired = self.trainer.strategy.reduce(fired.float(), reduce_op="sum").long()
            num_tokens *= self.trainer.world_size
        self.record_firing(fired, num_tokens)
        self.log_training_metrics(self.training_metrics(x, out))
        return {"loss": out.loss, "fired": fired.detach(), "num_tokens": num_tokens}

    # The pieces of training_step, also called one by one by a sweep that spreads its members over DDP ranks
    # (lightning_modules/sae/sweep_ranks.py): only a member's owner rank runs the forward.
    def dead_latents(self) -> Tensor:
        """(d_sae,) bool: the latents that have not fired for ``dead_tokens_threshold`` tokens."""
        return self.tokens_since_fired >= self.hparams.dead_tokens_threshold

    @torch.no_grad()
    def record_firing(self, fired: Tensor, num_tokens: int) -> None:
        """Count a step's firings: ``fired`` (d_sae,) per-latent counts over ``num_tokens`` tokens (all ranks')."""
        self.tokens_since_fired += num_tokens
        # masked_fill_, not boolean indexing: indexing needs the number of hits on the host (a CUDA sync).
        self.tokens_since_fired.masked_fill_(fired > 0, 0)
        self.window_fired += fired
        self.window_tokens += num_tokens

    def metrics_due(self) -> bool:
        """Whether this step logs metrics: the loss terms every ``log_every_n_steps`` steps, L0 and explained
        variance every ``metrics_every_n_steps``."""
        return self._loss_terms_due() or self._window_due()

    def _loss_terms_due(self) -> bool:
        # Lightning writes step values only every log_every_n_steps; recording them on the other steps is pure
        # per-step overhead, which dominates when the SAE step is a few small GPU kernels.
        log_every = self.trainer.log_every_n_steps
        return bool(log_every) and (self.global_step + 1) % log_every == 0

    def _window_due(self) -> bool:
        return (self.global_step + 1) % self.hparams.metrics_every_n_steps == 0

    def training_metrics(self, x: Tensor, out: SaeOutput) -> dict[str, Tensor]:
        """The metrics of this step's forward (normalised inputs ``x``, output ``out``) due for logging now
        (``metrics_due``), keyed by names among ``TRAINING_METRICS``."""
        metrics = {}
        if self._loss_terms_due():
            metrics = {
                "train/loss": out.loss,
                "train/mse": out.mse,
                "train/sparsity": out.sparsity,
                "train/aux": out.aux,
            }
            if out.reconstruction is not out.mse:
                metrics["train/reconstruction"] = out.reconstruction
        if self._window_due():
            with torch.no_grad():
                metrics["train/l0"] = (out.latents > 0).sum(-1).float().mean()
                metrics["train/explained_variance"] = explained_variance(x, out.x_hat)
        return metrics

    def log_training_metrics(self, metrics: dict[str, Tensor], sync_dist: bool = True) -> None:
        """Log ``training_metrics``; on a metrics step with them the dead and dense fractions (from the firing
        counters, the same on every rank), then start a new metrics window. ``sync_dist``: average L0 and explained
        variance over ranks (False where they already describe every rank's rows)."""
        per_step = {name: value for name, value in metrics.items() if name not in _WINDOW_METRICS}
        if per_step:
            self.log_dict(per_step, prog_bar=False)
        if self._window_due():
            self._log_sparsity_metrics({name: metrics[name] for name in _WINDOW_METRICS}, sync_dist)

    @torch.no_grad()
    def _log_sparsity_metrics(self, metrics: dict[str, Tensor], sync_dist: bool) -> None:
        frequency = self.window_fired.float() / self.window_tokens.clamp_min(1)
        self._warn_if_dense(float(self.window_fired.sum()) / max(int(self.window_tokens), 1))
        self.log_dict(
            {
                **metrics,
                "train/dead_fraction": self.dead_latents().float().mean(),
                "train/dense_fraction": (frequency > 10**self.hparams.dense_log_freq).float().mean(),
            },
            prog_bar=True,
            sync_dist=sync_dist,
        )
        self.window_fired.zero_()
        self.window_tokens.zero_()

    def _warn_if_dense(self, l0: float) -> None:
        """Warn once when L0, averaged over a metrics window, stays above max_l0_fraction * d_in: above it in two
        consecutive windows and down by less than 10% from the first to the second (an L1 or L0 penalty that is
        still pulling L0 down is left to work). The counts are summed over ranks, so ranks agree."""
        limit = self.hparams.max_l0_fraction
        previous, self._previous_l0 = self._previous_l0, l0
        d_in = self.hparams.act_vec_size
        if limit is None or self._warned_dense or previous is None or min(l0, previous) <= limit * d_in:
            return
        if self.sae.architecture.sparsity_setting == "k":  # L0 = k (on average for BatchTopK): set, not learned
            return
        if l0 < 0.9 * previous:
            return
        self._warned_dense = True
        architecture = self.sae.architecture
        setting = architecture.sparsity_setting
        rank_zero_warn(
            f"the SAE is not sparse: L0 = {l0:.0f} active latents per token over the last "
            f"{self.hparams.metrics_every_n_steps} steps ({previous:.0f} the window before), above "
            f"max_l0_fraction = {limit} of d_in = {d_in}; {'raise' if architecture.raise_for_sparsity else 'lower'} "
            f"{self._settings_path()}architecture.init_args.{setting} (now {getattr(architecture, setting)}) of "
            f"{type(architecture).__name__} for a sparser SAE{architecture.sparsity_note}"
        )

    def _settings_path(self) -> str:
        name = getattr(self, "_sweep_name", None)
        return "model.init_args." if name is None else f"sweep member {name}'s "

    def reset_latent_statistics(self, latents: Tensor) -> None:
        """Forget when ``latents`` (a (d_sae,) bool mask) last fired: resampling gave them new weights."""
        self.tokens_since_fired.masked_fill_(latents.to(self.tokens_since_fired.device), 0)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.sae.normalize_decoder:
            zero.update_grad(self.sae.W_dec, remove_parallel_component_)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.renormalize_decoder()

    def renormalize_decoder(self) -> None:
        """Right after the optimiser step (Towards Monosemanticity: decoder rows at unit norm), before any callback's
        on_train_batch_end: a step checkpoint then holds the renormalised decoder that the next step starts from."""
        if self.sae.normalize_decoder:
            zero.update_param(self.sae.W_dec, unit_norm_rows_)

    # ------------------------------------------------------------------------------------- inside a sweep
    def attach_to_sweep(self, sweep: pl.LightningModule, name: str) -> None:
        """Run as member ``name`` of ``sweep`` (``SparseAutoencoderSweep``): its hooks call this module's, and what
        this module logs goes to the sweep's logger under ``{name}/``."""
        # Kept out of nn.Module's registry: the sweep holds this module, not the other way round.
        self.__dict__["_sweep"] = sweep
        self._sweep_name = name
        self.trainer = sweep.trainer

    def log(self, name: str, value, *args, **kwargs) -> None:
        sweep = getattr(self, "_sweep", None)
        if sweep is None:
            return super().log(name, value, *args, **kwargs)
        return sweep.log(f"{self._sweep_name}/{name}", value, *args, **kwargs)

    # ---------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: Tensor, batch_idx: int, shared: dict | None = None) -> None:
        """With the data module's LLM (``hooked_llm_at(site)``), batches are token ids: the activation-space metrics
        and the downstream ones of the reconstruction spliced into the LLM. Otherwise batches are activations:
        ``val/l0``, ``val/mse`` and ``val/explained_variance`` only. ``shared``: what the SAEs of a sweep reading the
        same site share on this batch (its activations, the clean and zero-ablated logits), filled by the first."""
        hooked_llm_at = getattr(self._datamodule(), "hooked_llm_at", None)
        hooked = hooked_llm_at(self.hparams.site) if callable(hooked_llm_at) else None
        skip_first = hooked is not None and self.trainer.datamodule.hparams.exclude_first_position
        if hooked is None:
            acts = self.activations(batch)
        else:
            at_site = (shared or {}).get(self.hparams.site)
            if at_site is None:
                at_site = {"acts": hooked.harvest(batch)[:, int(skip_first) :],
                           "reference": hooked.reference_logits(batch, skip_first)}  # fmt: skip
                if shared is not None:
                    shared[self.hparams.site] = at_site
            acts = at_site["acts"]
        x = self.normalize(acts.reshape(-1, acts.shape[-1]).to(self.device))
        out = self.sae(x)
        metrics = {"val/l0": (out.latents > 0).sum(-1).float().mean(), "val/mse": out.mse}
        if hooked is not None:
            splice = hooked.splice_metrics(
                batch,
                lambda a: self.reconstruct(a.to(self.device)).to(a.device),
                skip_first_position=skip_first,
                reference=at_site["reference"],
            )
            for name in ("ce_loss_recovered", "kl", "ce_spliced", "ce_clean"):
                metrics[f"val/{name}"] = splice[name]
        self.log_dict({k: v.to(self.device) for k, v in metrics.items()}, sync_dist=True)
        # A torchmetrics Metric: Lightning computes it once over the whole validation set at the epoch's end.
        self.val_explained_variance.update(x, out.x_hat)
        self.log("val/explained_variance", self.val_explained_variance)

    # ------------------------------------------------------------------------------------------ optimiser
    def parameter_groups(self) -> list[dict]:
        """This SAE's Adam parameter groups (``optim.parameter_groups``)."""
        hp = self.hparams
        return parameter_groups(self.parameters(), self.sae.W_dec, hp.learning_rate, hp.decoder_lr_multiplier)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        resume_decoder_lr_multiplier({"": self}, checkpoint, self._trainer)  # None in load_from_checkpoint

    def configure_optimizers(self):
        optimizer = adam(self.parameter_groups(), betas=self.hparams.adam_betas)
        if not self.hparams.lr_warmup_steps:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(self.hparams.lr_warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
