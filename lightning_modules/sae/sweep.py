"""SparseAutoencoderSweep: many SAEs trained on the same activations, one LLM forward (or one cache read) for all.

    neurolight fit --config configs/sae/sweep-demo.yaml

A sweep over k, width, architecture, sparsity coefficient or learning rate pays for the activations once instead of
once per SAE. Each member is a ``SparseAutoencoderModule`` with its own normalisation scalar, dead-latent counters,
metrics (logged under ``{name}/``), histogram and resampling (``DeadLatentResampler`` and ``SaeCheckpoint`` treat each
member as they treat a single SAE). The members' losses are summed into one backward: a member's parameters get
the gradient of its own loss only, and one Adam with a parameter group per member is, parameter by parameter, the
Adam each would have alone; so a member trains as its separate fit on the same batches would (docs/sae.md, Sweeps).
``SparseAutoencoder.from_pretrained(checkpoint, name=...)`` reads one member back.

The members may also read different sites, as sparsify trains SAEs on all layers at once: a data module given
``sites`` reads them all in one forward pass (or one read of the cache) and serves batches ``{site: activations}``
of the same tokens; each member names its ``site`` and, where its width differs from the sweep's, its
``act_vec_size`` (docs/sae.md, Sweeps over sites).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from torch import nn

from neurolight.lightning_modules.sae.architectures import Architecture, TopK, build_architecture
from neurolight.lightning_modules.sae.checkpoint_args import resume_decoder_lr_multiplier
from neurolight.lightning_modules.sae.module import SparseAutoencoderModule
from neurolight.lightning_modules.sae.optim import adam, linear_warmup
from neurolight.lightning_modules.sae.sweep_ranks import gather_batch, plan_owners, spread_training_step


@dataclass
class SweepMember:
    """One SAE of a sweep."""

    name: str
    """Unique name: its metrics are logged as ``{name}/train/loss`` ..., its histograms named after it."""
    dict_vec_size: int
    """Number of latents (d_sae)."""
    architecture: Architecture = field(default_factory=TopK)
    """The SAE architecture and its settings, as for ``SparseAutoencoderModule``."""
    learning_rate: float | None = None
    """Adam learning rate; default: the sweep's."""
    decoder_lr_multiplier: float | None = None
    """The decoder weight's learning rate as a multiple of its learning rate; default: the sweep's, else its
    architecture's."""
    lr_warmup_steps: int | None = None
    """Linear learning-rate warm-up steps; default: the sweep's."""
    site: str | None = None
    """The site it reads where the data module serves several (``layers.15.mlp_sublayer``); default: the only one."""
    act_vec_size: int | None = None
    """Width of its site's activations (d_in); default: the sweep's."""


class SparseAutoencoderSweep(pl.LightningModule):
    def __init__(
        self,
        act_vec_size: int | None,
        saes: list[SweepMember],
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
        distribute_members: bool = False,
    ) -> None:
        """
        Args:
            act_vec_size: Width of the activations the members read (d_in), for those that set none (null when each
                member sets its own).
            saes: The members: each a name, a number of latents, an architecture and optionally its own learning
                rate and warm-up.
            learning_rate: Adam learning rate of the members that set none.
            decoder_lr_multiplier: The decoder weight's learning rate as a multiple of the member's learning rate,
                for the members that set none (1: the same). Default (None): each member's architecture's, as for
                ``SparseAutoencoderModule`` (docs/sae.md, Decoder learning rate).
            adam_betas: Adam betas.
            lr_warmup_steps: Linear learning-rate warm-up steps of the members that set none (0: none).
            dead_tokens_threshold: A latent is dead when it has not fired for this many tokens.
            dense_log_freq: A latent is dense when log10 of its firing frequency over a metrics window exceeds this.
            normalize_dataset: Scale activations by one scalar so that E||x|| = sqrt(d_in) (per member, from the
                same data: the same value).
            metrics_every_n_steps: Steps between logs of L0, explained variance, dead and dense fractions.
            max_l0_fraction: Warn when a member's L0 stays above this fraction of d_in (None: never).
            norm_estimation_batches: Batches the normalisation scalar is estimated from without a data module that
                provides it.
            distribute_members: Under DDP, train each member on one rank only (its owner, the members balanced by
                d_sae * d_in), on the rows of all ranks gathered: a member trains as in a one-process sweep whose
                batch holds every rank's; compute is spread, memory is not (every rank holds every member and its
                Adam state; docs/sae.md, Sweeps). False: every rank trains every member on its own rows. Without
                DDP it changes nothing.
        """
        super().__init__()
        members = [member if isinstance(member, SweepMember) else SweepMember(**member) for member in saes]
        for member in members:
            member.architecture = build_architecture(member.architecture)
        if not members:
            raise ValueError("a sweep needs at least one SAE in saes")
        names = [member.name for member in members]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"the sweep names {', '.join(duplicates)} more than once; give every SAE its own name")
        bad = [name for name in names if not name or "/" in name or "." in name]
        if bad:
            raise ValueError(f"sweep names {bad} must be non-empty, without '/' or '.' (they name metrics and files)")
        if act_vec_size is None and (unsized := [member.name for member in members if member.act_vec_size is None]):
            raise ValueError(
                f"the sweep members {', '.join(unsized)} have no act_vec_size; set the sweep's act_vec_size or theirs"
            )
        self.save_hyperparameters(ignore=["saes"])
        self.hparams["saes"] = [member_config(member) for member in members]
        shared = dict(
            adam_betas=adam_betas,
            dead_tokens_threshold=dead_tokens_threshold,
            dense_log_freq=dense_log_freq,
            normalize_dataset=normalize_dataset,
            metrics_every_n_steps=metrics_every_n_steps,
            max_l0_fraction=max_l0_fraction,
            norm_estimation_batches=norm_estimation_batches,
        )
        with _own_hyperparameters():
            defaults = dict(
                learning_rate=learning_rate,
                decoder_lr_multiplier=decoder_lr_multiplier,
                lr_warmup_steps=lr_warmup_steps,
            )
            self.units = self._build_units(act_vec_size, members, defaults, shared)
        self._record_decoder_lr_multipliers()
        self._owners: dict[str, int] | None = None  # member name -> owner rank, while spread over DDP ranks

    @staticmethod
    def _build_units(act_vec_size, members, defaults: dict, shared) -> nn.ModuleDict:
        """One SparseAutoencoderModule per member; ``defaults`` (learning rate, decoder multiplier, warm-up) fill in
        the settings a member leaves None."""
        return nn.ModuleDict(
            {
                member.name: SparseAutoencoderModule(
                    act_vec_size if member.act_vec_size is None else member.act_vec_size,
                    member.dict_vec_size,
                    member.architecture,
                    **{
                        key: value if getattr(member, key) is None else getattr(member, key)
                        for key, value in defaults.items()
                    },
                    site=member.site,
                    **shared,
                )
                for member in members
            }
        )

    # The members' own hooks, called for each in turn.
    def setup(self, stage: str) -> None:
        for name, unit in self.units.items():
            unit.attach_to_sweep(self, name)
            unit.setup(stage)
        spread = stage == "fit" and self.hparams.distribute_members and self.trainer.world_size > 1
        self._owners = plan_owners(self.trainer, self.units) if spread else None

    def on_train_start(self) -> None:
        for unit in self.units.values():
            unit.on_train_start()

    def training_step(self, batch, batch_idx: int) -> dict:
        if self._owners is not None:
            return spread_training_step(self.units, self._owners, gather_batch(batch))
        outputs = {name: unit.training_step(batch, batch_idx) for name, unit in self.units.items()}
        # One backward for all: each member's parameters receive only its own loss's gradient.
        loss = torch.stack([output["loss"] for output in outputs.values()]).sum()
        return {"loss": loss, "units": outputs}

    def on_before_optimizer_step(self, optimizer) -> None:
        for unit in self.units.values():
            unit.on_before_optimizer_step(optimizer)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for unit in self.units.values():
            unit.renormalize_decoder()

    def validation_step(self, batch, batch_idx: int) -> None:
        shared = {}  # per site: the LLM's activations and reference logits on this batch, computed once
        for unit in self.units.values():
            unit.validation_step(batch, batch_idx, shared)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        resume_decoder_lr_multiplier(dict(self.units.items()), checkpoint, self._trainer)
        self._record_decoder_lr_multipliers()

    def _record_decoder_lr_multipliers(self) -> None:
        """What a checkpoint records for each member: the multiplier it trains with (resolved from the defaults);
        loggers write ``hparams_initial`` (hparams.yaml), which gets the members too."""
        for config in self.hparams["saes"]:
            config["decoder_lr_multiplier"] = self.units[config["name"]].hparams.decoder_lr_multiplier
        self._hparams_initial["saes"] = copy.deepcopy(self.hparams["saes"])

    def configure_optimizers(self):
        groups, warmups = [], []
        for unit in self.units.values():
            unit_groups = unit.parameter_groups()
            groups += unit_groups
            warmups += [unit.hparams.lr_warmup_steps] * len(unit_groups)
        optimizer = adam(groups, betas=self.hparams.adam_betas)
        if not any(warmups):
            return optimizer
        schedules = [linear_warmup(steps) for steps in warmups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------ for the callbacks
    def sweep_units(self) -> dict[str, SparseAutoencoderModule]:
        """The members by name (what ``DeadLatentResampler`` and ``SaeCheckpoint`` iterate over)."""
        return dict(self.units.items())

    @staticmethod
    def unit_outputs(outputs: dict) -> dict[str, dict]:
        """Each member's ``training_step`` output, by name, from the sweep's."""
        return outputs["units"]


def member_config(member: SweepMember) -> dict:
    """A member as the plain mapping a checkpoint's hyperparameters hold."""
    from neurolight.lightning_modules.sae.architectures import architecture_config

    return {
        "name": member.name,
        "dict_vec_size": member.dict_vec_size,
        "architecture": architecture_config(member.architecture),
        "learning_rate": member.learning_rate,
        "decoder_lr_multiplier": member.decoder_lr_multiplier,
        "lr_warmup_steps": member.lr_warmup_steps,
        "site": member.site,
        "act_vec_size": member.act_vec_size,
    }


def units_of(pl_module: pl.LightningModule, outputs: dict | None = None) -> list[tuple[str, pl.LightningModule, dict]]:
    """``(name, module, training_step output)`` of each SAE a module trains: the members of a sweep, or the module
    itself (name ``""``)."""
    units = getattr(pl_module, "sweep_units", None)
    if units is None:
        return [("", pl_module, outputs)]
    per_unit = pl_module.unit_outputs(outputs) if outputs is not None else {}
    return [(name, unit, per_unit.get(name)) for name, unit in units().items()]


@contextmanager
def _own_hyperparameters():
    """Members built inside it record their own arguments as hyperparameters. Under LightningCLI,
    ``save_hyperparameters`` records the arguments the CLI gave for the module it instantiates (the sweep) in every
    module built during that instantiation, so without this each member's ``hparams`` would be the sweep's: its own
    learning rate, warm-up, width and site lost."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)


def trained_batch(outputs: dict, batch):
    """The batch the SAEs trained on at a step, given its ``training_step`` output: every rank's rows where a sweep
    spreads its members over ranks (``distribute_members``), else this rank's ``batch``."""
    return outputs.get("activations", batch) if isinstance(outputs, dict) else batch
