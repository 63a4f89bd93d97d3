"""DeadLatentResampler: give latents that stopped firing a new direction, on a fixed step schedule.

Needs a LightningModule with ``sae`` (a SparseAutoencoder), ``activations(batch)``, ``normalize(x)``,
``reset_latent_statistics(dead)`` and a ``training_step`` that returns ``fired`` (per-latent firing counts of the step,
summed over ranks), as SparseAutoencoderModule does. What to reset besides the encoder and decoder (JumpReLU's
thresholds, BatchTopK's running threshold) the SAE's architecture says (``Architecture.resample_resets``).

In a ``SparseAutoencoderSweep`` each member is resampled as a single SAE would be: its own firing counts, its own
generator (seeded alike, so a member draws what its separate fit would), the recent inputs of its site in its own
normalisation (each site's inputs are kept as the first member reading it normalises them, and rescaled for the
others). A sweep that spreads its members over DDP ranks (``distribute_members``) trains on every rank's rows: those
are the inputs kept.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from neurolight.datamodules.llm import zero
from neurolight.lightning_modules.sae.architectures import unit_norm_rows
from neurolight.lightning_modules.sae.sweep import trained_batch, units_of

METHODS = ("replacement", "anthropic")


class DeadLatentResampler(pl.Callback):
    def __init__(
        self,
        method: str = "anthropic",
        neuron_resampling_interval: int = 25_000,
        num_resampling_inputs: int = 8192,
        encoder_scale: float = 0.2,
        last_resampling_step: int | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            method: ``replacement``: dead latents get random unit directions, encoder rows at the mean norm of
                the live ones. ``anthropic`` (Towards Monosemanticity, appendix): directions are training inputs
                drawn with probability proportional to their squared reconstruction loss, encoder rows at
                ``encoder_scale`` x the mean live encoder norm. Both zero the encoder bias and Adam moments of
                the touched rows.
            neuron_resampling_interval: Steps between resamplings; a latent that did not fire in the whole
                interval is dead.
            num_resampling_inputs: Most recent training inputs kept for ``anthropic`` loss sampling.
            encoder_scale: Encoder norm factor of ``anthropic`` resampling (0.2 in the paper).
            last_resampling_step: No resampling after this step (the paper stops before the end of training).
            seed: Seed of the resampler's own generator (checkpointed).
        """
        if method not in METHODS:
            raise ValueError(f"unknown resampling method '{method}'; choose one of {', '.join(METHODS)}")
        if neuron_resampling_interval < 1:
            raise ValueError(f"neuron_resampling_interval must be >= 1, got {neuron_resampling_interval}")
        self.method = method
        self.interval = neuron_resampling_interval
        self.num_inputs = num_resampling_inputs
        self.encoder_scale = encoder_scale
        self.last_step = last_resampling_step
        self.seed = seed
        self.generators: dict[str, torch.Generator] = {}  # per SAE ("" for a single one), made on first use
        self.fired: dict[str, Tensor] = {}
        # Per site ("" for SAEs that name none): ring buffer of recent inputs normalised by the first SAE reading it
        # (anthropic), and that normalisation scalar.
        self.inputs: dict[str, Tensor] = {}
        self.inputs_scale: dict[str, float] = {}
        self.inputs_seen = 0
        self.history: list[dict] = []

    @property
    def state_key(self) -> str:
        return f"DeadLatentResampler[{self.method},{self.interval}]"

    # ------------------------------------------------------------------------------------------ tracking
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        units = units_of(pl_module, outputs)
        for name, _, output in units:
            fired = output["fired"].detach()
            self.fired[name] = fired.clone() if name not in self.fired else self.fired[name].to(fired.device) + fired
        if self.method == "anthropic":
            readers = {}  # the first SAE reading each site
            for _, unit, _ in units:
                readers.setdefault(_site(unit), unit)
            trained = trained_batch(outputs, batch)
            for site, unit in readers.items():
                if site not in self.inputs_scale:  # fixed once estimated; float() of a CUDA tensor syncs every step
                    self.inputs_scale[site] = float(unit.activation_scale)
                x = unit.normalize(unit.activations(trained)).detach()[-self.num_inputs :]
                self._remember(site, x)
            self.inputs_seen += len(x)  # the same rows (tokens) of every site
        step = trainer.global_step
        if step % self.interval == 0 and (self.last_step is None or step <= self.last_step):
            for name, unit, _ in units:
                self.resample(trainer, unit, name)

    def _remember(self, site: str, x: Tensor) -> None:
        """Write this step's inputs of ``site`` into its ring buffer (``inputs_seen`` is counted once a step)."""
        if site not in self.inputs:
            self.inputs[site] = torch.zeros(self.num_inputs, x.shape[1], dtype=x.dtype, device=x.device)
        inputs = self.inputs[site]
        slots = (self.inputs_seen + torch.arange(len(x))) % self.num_inputs
        inputs[slots.to(inputs.device)] = x.to(inputs.device)

    # ------------------------------------------------------------------------------------------ resampling
    def generator(self, name: str = "") -> torch.Generator:
        if name not in self.generators:
            self.generators[name] = torch.Generator().manual_seed(self.seed)
        return self.generators[name]

    @torch.no_grad()
    def resample(self, trainer, pl_module, name: str = "") -> int:
        """Resample the latents of ``pl_module`` (an SAE module, or the member ``name`` of a sweep) that did not fire
        since the last resampling; returns how many."""
        dead = self.fired[name] == 0  # counts over all ranks (the module reduces them), so ranks agree
        self.fired[name].zero_()
        num_dead = int(dead.sum())
        self.history.append({"step": trainer.global_step, "dead": num_dead, **({"sae": name} if name else {})})
        pl_module.log("train/resampled", float(num_dead))
        if num_dead == 0:
            return 0
        sae = pl_module.sae
        w_enc, w_dec, b_dec = (zero.full_param(p).clone() for p in (sae.W_enc, sae.W_dec, sae.b_dec))
        live = ~dead
        enc_norm = w_enc[live].norm(dim=1).mean() if live.any() else torch.tensor(1.0, device=w_enc.device)
        if self.method == "replacement":
            directions = torch.randn(num_dead, w_dec.shape[1], generator=self.generator(name)).to(w_dec)
            enc_scale = enc_norm
        else:
            directions = self._loss_weighted_inputs(pl_module, num_dead, b_dec, self.generator(name))
            enc_scale = self.encoder_scale * enc_norm
        # Ranks drew from the same generator; rank 0's inputs are the ones used everywhere.
        directions = trainer.strategy.broadcast(directions.cpu(), src=0).to(w_dec)
        directions = unit_norm_rows(directions)
        dec_scale = w_dec[live].norm(dim=1).mean() if (live.any() and not sae.normalize_decoder) else 1.0
        w_dec[dead] = directions * dec_scale
        w_enc[dead] = directions * enc_scale
        zero.set_param(sae.W_dec, w_dec)
        zero.set_param(sae.W_enc, w_enc)
        zero.update_param(sae.b_enc, lambda b: b.masked_fill(dead.to(b.device), 0.0))
        touched = [(sae.W_enc, dead), (sae.W_dec, dead), (sae.b_enc, dead)]
        for reset in sae.architecture.resample_resets():
            tensor = getattr(sae, reset.name)
            if isinstance(tensor, torch.nn.Parameter):
                zero.update_param(tensor, lambda t, value=reset.value: _reset(t, dead, value))
                touched.append((tensor, dead if tensor.ndim else torch.tensor(True)))
            else:
                tensor.copy_(_reset(tensor, dead, reset.value))
        optimizer = trainer.optimizers[0]
        for param, rows in touched:
            zero.zero_adam_rows(optimizer, param, rows)
        pl_module.reset_latent_statistics(dead)
        return num_dead

    def _loss_weighted_inputs(self, pl_module, n: int, b_dec: Tensor, generator: torch.Generator) -> Tensor:
        available = min(self.inputs_seen, self.num_inputs)
        if available == 0:
            raise RuntimeError("anthropic resampling needs training inputs, but none were seen in this interval")
        sae, site = pl_module.sae, _site(pl_module)
        inputs = self.inputs[site][:available].to(b_dec.device, sae.W_enc.dtype)
        scale = float(pl_module.activation_scale)
        kept_at = self.inputs_scale.get(site, scale)  # (checkpoints of before sweeps did not record it)
        if scale != kept_at:  # a sweep member with its own scalar
            inputs = inputs * (scale / kept_at)
        x_hat = sae(inputs).x_hat
        weights = (inputs - x_hat).float().pow(2).sum(1).pow(2)  # loss squared (Towards Monosemanticity)
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        picks = torch.multinomial(weights.cpu(), n, replacement=n > available, generator=generator)
        return inputs[picks.to(inputs.device)] - b_dec.to(inputs)

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "generators": {name: generator.get_state() for name, generator in self.generators.items()},
            "fired": {name: fired.cpu() for name, fired in self.fired.items()},
            "inputs": {site: inputs.cpu() for site, inputs in self.inputs.items()},
            "inputs_scale": dict(self.inputs_scale),
            "inputs_seen": self.inputs_seen,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:  # written before sweeps: one SAE, one generator
            state = {**state, "generators": {"": state["generator"]}}
            state["fired"] = {} if state["fired"] is None else {"": state["fired"]}
        for name, generator_state in state["generators"].items():
            self.generator(name).set_state(generator_state)
        self.fired = dict(state["fired"])
        inputs, scale = state["inputs"], state.get("inputs_scale")
        if not isinstance(inputs, dict):  # written before sweeps over sites: one site, ""
            inputs, scale = ({} if inputs is None else {"": inputs}), ({} if scale is None else {"": scale})
        self.inputs, self.inputs_scale = dict(inputs), dict(scale or {})
        self.inputs_seen = state["inputs_seen"]
        self.history = list(state["history"])


def _site(unit) -> str:
    """The site an SAE module reads, "" where it names none (its data module's only site)."""
    return unit.hparams.get("site") or ""


def _reset(tensor: Tensor, dead: Tensor, value: float) -> Tensor:
    """``tensor`` with ``value`` at the dead latents' entries, or everywhere for a tensor with no latent dimension."""
    if tensor.ndim == 0:
        return torch.full_like(tensor, value)
    return tensor.masked_fill(dead.to(tensor.device).view(-1, *([1] * (tensor.ndim - 1))), value)
