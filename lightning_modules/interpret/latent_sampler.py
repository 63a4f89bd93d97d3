"""LatentSampler: the contexts that show what each latent of a trained SAE responds to (interpretation samples).

    neurolight predict --config configs/interpret/sample.yaml

Two passes over a tokenized corpus (``neurolight.datamodules.CorpusContextDataModule``; docs/interpret.md,
Sampling): pass 0 counts how often every latent fires; then only the latents with
``log_freq_lower < log10(frequency) < log_freq_upper`` are kept, and pass 1 selects their top, quantile, random and
negative contexts with per-token activations in a ``RunningLatentSamples`` on the device (bounded memory).
``neurolight.callbacks.InterpretationSamplesWriter`` writes the result in the format of
``neurolight.datamodules.interpret.samples``,
and snapshots the progress so that a killed run continues where it stopped
(``neurolight.callbacks.interpret.sampler_snapshot``).

The SAE may come from any source ``SparseAutoencoder.from_pretrained`` reads (a neurolight checkpoint, or a
neurolight, SAELens or sparsify directory); it encodes raw activations of its site, its training normalisation
folded into its weights (docs/sae.md, Formats).
"""

from __future__ import annotations

import hashlib

import lightning.pytorch as pl
import torch
from torch import Tensor

from neurolight.datamodules.llm.hooked import LAYER_TYPES, HookedLLM
from neurolight.datamodules.llm.models import dtype_from_name
from neurolight.lightning_modules.interpret.running_samples import RunningLatentSamples
from neurolight.lightning_modules.sae.architectures import architecture_name
from neurolight.lightning_modules.sae.site import load_site_llm, resolve_site
from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

_HOOKPOINT_ARGS = {f"{layer_type}_hookpoint": layer_type for layer_type in LAYER_TYPES}


def sae_fingerprint(sae: SparseAutoencoder) -> str:
    """A short hash of the SAE's weights (raw-space, as loaded): stores refuse to mix the interpretations of two
    SAEs that share an index name (two checkpoints of one run have the same hyperparameters, hence the same name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentSampler(pl.LightningModule):
    def __init__(
        self,
        sae_checkpoint: str,
        sae_name: str | None = None,
        model_name: str | None = None,
        layer_id: int | None = None,
        layer_type: str | None = None,
        mlp_activations_hookpoint: str | None = None,
        mlp_sublayer_hookpoint: str | None = None,
        attn_sublayer_hookpoint: str | None = None,
        resid_pre_hookpoint: str | None = None,
        resid_post_hookpoint: str | None = None,
        llm_dtype: str | None = None,
        device_llm: str | None = None,
        exclude_first_position: bool | None = None,
        log_freq_lower: float = -4.0,
        log_freq_upper: float = -1.0,
        num_top: int = 20,
        num_quantiles: int = 5,
        num_per_quantile: int = 4,
        num_random: int = 10,
        num_negative: int = 10,
        seed: int = 0,
    ) -> None:
        """
        Args:
            sae_checkpoint: The SAE: a checkpoint of ``neurolight fit`` (``.../checkpoints/last.ckpt``), or a
                directory in neurolight's, SAELens's or sparsify's format (``neurolight-export`` writes them). Its
                metadata gives the LLM and site it was trained on, the defaults of the arguments below.
            sae_name: The SAE of a sweep's checkpoint (``SparseAutoencoderSweep``) to sample, by its name.
            model_name: LLM whose activations the SAE encodes; default: the one it was trained on.
            layer_id: Decoder layer of the hook point; default: the training run's.
            layer_type: ``resid_pre``, ``resid_post``, ``attn_sublayer``, ``mlp_sublayer`` or ``mlp_activations``;
                default: the training run's (an SAELens hook name such as ``blocks.15.hook_mlp_out`` is mapped).
            mlp_activations_hookpoint: Module whose INPUT is the MLP activation (``{}`` = layer); default: the run's.
            mlp_sublayer_hookpoint: Module whose output is the MLP sublayer output; default: the training run's.
            attn_sublayer_hookpoint: Module whose output (element 0) is the attention output; default: the run's.
            resid_pre_hookpoint: Decoder layer whose INPUT is the residual stream; default: the training run's.
            resid_post_hookpoint: Decoder layer whose output is the residual stream; default: the training run's.
            llm_dtype: ``float32``, ``bfloat16`` or ``float16`` LLM weights; default: the training run's.
            device_llm: Device of the LLM, e.g. ``cuda:1``; default: the trainer's device for this rank (the SAE
                always runs on the trainer's device).
            exclude_first_position: Set activations at position 0 (BOS / attention sink) to 0 and leave that
                position out of the firing counts; default: as in training (True where the SAE does not record it,
                as for a neurolight training run).
            log_freq_lower: Keep latents with log10(firing frequency) above this (rarer ones are left out).
            log_freq_upper: Keep latents with log10(firing frequency) below this (denser ones are left out).
            num_top: Top-activating contexts (ranked by max activation) kept per latent.
            num_quantiles: Activation bins per latent: equal slices of [0, its max in the frequency pass), contexts
                above that max going to the top bin; contexts are sampled within each bin.
            num_per_quantile: Contexts sampled uniformly within each bin.
            num_random: Uniformly random contexts per latent (firing or not).
            num_negative: Random contexts where the latent never fires, per latent.
            seed: Seed of the random selections (they do not depend on batch order or the number of ranks).
        """
        super().__init__()
        if not log_freq_lower < log_freq_upper:
            raise ValueError(
                f"log_freq_lower={log_freq_lower} must be below log_freq_upper={log_freq_upper}: latents are kept "
                "when lower < log10(frequency) < upper, e.g. lower -4 and upper -1"
            )
        if layer_type is not None and layer_type not in LAYER_TYPES:
            raise ValueError(f"unknown layer_type '{layer_type}'; choose one of {', '.join(LAYER_TYPES)}")
        if llm_dtype is not None:
            dtype_from_name(llm_dtype, "llm_dtype")  # refused here, before the checkpoint is read
        self.save_hyperparameters()
        loaded = SparseAutoencoder.from_pretrained(sae_checkpoint, sae_name).requires_grad_(False)
        self.sae_metadata = loaded.metadata
        self.llm_settings = resolve_site(
            loaded.metadata,
            sae_checkpoint,
            model_name,
            layer_type,
            layer_id,
            llm_dtype,
            exclude_first_position,
            {site: self.hparams[arg] for arg, site in _HOOKPOINT_ARGS.items()},
        )
        self.d_in, self.d_sae = loaded.d_in, loaded.d_sae
        self._sae_fingerprint = sae_fingerprint(loaded)
        self.sae = loaded  # a submodule: Lightning moves it to the trainer's device
        self.register_buffer("fired", torch.zeros(self.d_sae, dtype=torch.long))
        self.register_buffer("frequency_max", torch.zeros(self.d_sae))
        self.register_buffer("frequency_tokens", torch.zeros((), dtype=torch.long))
        # Contexts of each pass taken in, a resumed run's included. These buffers count this rank's contexts only;
        # frequency_totals (over all ranks) choose the band.
        self.register_buffer("contexts_done", torch.zeros(2, dtype=torch.long))
        self.hooked_llm: HookedLLM | None = None
        self.samples: RunningLatentSamples | None = None
        self.band: dict | None = None  # the frequency band's outcome, set at the first sampling batch
        self.frequency_totals: dict[str, Tensor] | None = None  # the counts over all ranks, set with the band
        self._final: tuple[dict[str, Tensor], dict] | None = None
        self._resume: dict | None = None  # a killed run's progress_state, applied at on_predict_start
        self._resumed_pass_1: tuple[dict, dict] | None = None  # its band and samples, loaded with the band

    # ------------------------------------------------------------------------------------------------ models
    def configure_model(self) -> None:
        if self.hooked_llm is not None:
            return
        device = torch.device(self.hparams.device_llm) if self.hparams.device_llm else self._trainer_device()
        self.hooked_llm = load_site_llm(self.llm_settings, device, self.d_in, self.hparams.sae_checkpoint)

    def _trainer_device(self) -> torch.device:
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    @torch.no_grad()
    def encode(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, d_sae) SAE latents; position 0 is 0 with ``exclude_first_position``."""
        acts = self.hooked_llm.harvest(input_ids).to(self.device, self.sae.W_enc.dtype)
        latents = self.sae.encode(acts)
        if self.llm_settings["exclude_first_position"]:
            latents[:, 0] = 0
        return latents

    # --------------------------------------------------------------------------------------------- passes
    def on_predict_start(self) -> None:
        # A second trainer.predict starts afresh rather than adding to the first run's counts and samples, unless
        # resume_from gave it a killed run's progress to continue.
        for buffer in (self.fired, self.frequency_max, self.frequency_tokens, self.contexts_done):
            buffer.zero_()
        self.samples, self.band, self.frequency_totals, self._final = None, None, None, None
        state, self._resume, self._resumed_pass_1 = self._resume, None, None
        if state is not None:
            for name in ("fired", "frequency_max", "frequency_tokens", "contexts_done"):
                getattr(self, name).copy_(state[name])
            if state["samples"] is not None:
                self._resumed_pass_1 = state["band"], state["samples"]

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> int:
        """Fold a batch of (B,) corpus rows and (B, T) token ids into the firing counts (pass 0) or the running
        samples (pass 1); returns B, the number of contexts taken in.

        The samples are read once, by ``finalize``. Lightning keeps every batch's return value until the epoch ends
        (the samples writer writes at epoch end) and warns about None, so a step returns this small count, never
        tensors.
        """
        context_rows, input_ids = batch
        latents = self.encode(input_ids)
        if dataloader_idx == 0:
            counted = latents[:, 1:] if self.llm_settings["exclude_first_position"] else latents
            self.fired += (counted > 0).sum((0, 1))
            self.frequency_tokens += counted.shape[0] * counted.shape[1]
            torch.maximum(self.frequency_max, counted.amax((0, 1)).float(), out=self.frequency_max)
        else:
            self._ensure_samples()
            self.samples.update(latents[..., self.samples.latents], context_rows)
        self.contexts_done[dataloader_idx] += len(context_rows)
        return len(context_rows)

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _reduce_frequency_pass(self) -> dict[str, Tensor]:
        """The firing counts summed (the maxima maxed) over ranks, so every rank keeps the same latents."""
        counts = {"fired": self.fired, "frequency_max": self.frequency_max, "tokens": self.frequency_tokens}
        if self._world_size() == 1:
            return {name: count.clone() for name, count in counts.items()}
        gathered = self.all_gather(counts)
        return {
            "fired": gathered["fired"].sum(0),
            "frequency_max": gathered["frequency_max"].amax(0),
            "tokens": gathered["tokens"].sum(0),
        }

    def _ensure_samples(self) -> None:
        if self.samples is not None:
            return
        totals = self.frequency_totals = self._reduce_frequency_pass()
        hp = self.hparams
        self.band = frequency_band(totals["fired"], int(totals["tokens"]), hp.log_freq_lower, hp.log_freq_upper)
        self.samples = RunningLatentSamples(
            self.band["latents"].to(self.device),
            totals["frequency_max"][self.band["latents"].to(self.device)],
            num_tokens=self.trainer.datamodule.num_tokens,
            num_top=hp.num_top,
            num_quantiles=hp.num_quantiles,
            num_per_quantile=hp.num_per_quantile,
            num_random=hp.num_random,
            num_negative=hp.num_negative,
            seed=hp.seed,
        )
        resumed, self._resumed_pass_1 = self._resumed_pass_1, None
        if resumed is not None:  # the counts of all ranks, reduced again, must give the snapshot's band
            band, samples = resumed
            if not torch.equal(band["latents"], self.band["latents"].cpu()):
                raise RuntimeError("the resumed snapshot kept other latents than its firing counts give")
            self.samples.load_state_dict(samples)

    # ------------------------------------------------------------------------------------------ resuming
    def checkpoint_fingerprint(self) -> str:
        """``sae_fingerprint`` of the SAE as loaded (a progress snapshot records it)."""
        return self._sae_fingerprint

    def resume_from(self, state: dict | None) -> None:
        """Continue at the next ``trainer.predict`` from ``sampler_snapshot.progress_state(self)`` of a killed run
        (None: start afresh); the datamodule leaves out the contexts it took in (``skip_contexts``)."""
        self._resume = state

    def on_predict_end(self) -> None:
        self.finalize()

    # ------------------------------------------------------------------------------------------- results
    def finalize(self) -> tuple[dict[str, Tensor], dict] | None:
        """Merge the samples of all ranks (a collective: every rank calls it; repeated calls are free).

        Returns, on global rank zero, the tensors and metadata of ``neurolight.datamodules.interpret.samples``
        (``save_interpretation_samples`` writes them); None on the other ranks.
        """
        if self._final is None:
            self._ensure_samples()  # a rank that got no sampling batch still takes part in the collectives
            self.samples.gather(self.all_gather, self._world_size())
            self._final = self._assemble() if self.trainer.is_global_zero else ({}, {})
        return self._final if self.trainer.is_global_zero else None

    def _assemble(self) -> tuple[dict[str, Tensor], dict]:
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "contexts"):
            raise TypeError(
                f"LatentSampler reads token ids back through the datamodule's contexts(rows); "
                f"{type(datamodule).__name__} has none: use neurolight.datamodules.CorpusContextDataModule"
            )
        result = {k: v.cpu() for k, v in self.samples.results().items()}
        kinds = ("top", "quantile", "random", "negative")
        corpus_rows = torch.cat([result[f"{kind}_row"].flatten() for kind in kinds])
        unique_rows = corpus_rows[corpus_rows >= 0].unique()  # sorted
        totals = self.frequency_totals
        tensors = {
            "latents": self.band["latents"].cpu(),
            "frequency": totals["fired"].cpu().double() / max(int(totals["tokens"]), 1),
            "max_activation": result["max_activation"].float(),
            "contexts": datamodule.contexts(unique_rows).long(),
            "context_index": unique_rows,
        }
        for kind in kinds:
            rows = result[f"{kind}_row"]
            position = torch.searchsorted(unique_rows, rows.clamp_min(0))
            tensors[f"{kind}_context"] = torch.where(rows >= 0, position, -1)
            tensors[f"{kind}_activations"] = result[f"{kind}_activations"].float()
        return tensors, self.samples_metadata()

    def samples_metadata(self) -> dict:
        hp, settings, band, meta = self.hparams, self.llm_settings, self.band, self.sae_metadata
        architecture = self.sae.architecture
        datamodule = self.trainer.datamodule
        return {
            "sae_checkpoint": str(hp.sae_checkpoint),
            "sae_name": hp.sae_name,
            "sae_source_format": meta.source_format,
            "sae_hook_name": meta.hook_name,
            "sae_fingerprint": self._sae_fingerprint,
            "model_name": settings["model_name"],
            "layer_id": settings["layer_id"],
            "layer_type": settings["layer_type"],
            "hook_point": self.hooked_llm.hook_point.name,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "architecture": architecture_name(architecture),
            "architecture_settings": architecture.settings(),
            "k": architecture.settings().get("k"),
            "learning_rate": meta.training.get("learning_rate"),
            "l1_coefficient": architecture.settings().get("l1_coefficient"),
            "activation_scale": meta.activation_scale,
            "dataset_path": str(getattr(datamodule, "dataset_path", "")),
            "num_tokens": datamodule.num_tokens,
            "frequency_tokens": int(self.frequency_totals["tokens"]),
            "num_samples": int(getattr(datamodule, "num_samples", -1)),
            "log_freq_lower": hp.log_freq_lower,
            "log_freq_upper": hp.log_freq_upper,
            "num_latents": len(band["latents"]),
            "below_band": band["below"],
            "above_band": band["above"],
            "never_fired": band["never_fired"],
            "exclude_first_position": settings["exclude_first_position"],
            "num_top": hp.num_top,
            "num_quantiles": hp.num_quantiles,
            "num_per_quantile": hp.num_per_quantile,
            "num_random": hp.num_random,
            "num_negative": hp.num_negative,
            "seed": hp.seed,
        }


def frequency_band(fired: Tensor, tokens: int, log_freq_lower: float, log_freq_upper: float) -> dict:
    """The latents with lower < log10(fired / tokens) < upper, and how many fell out on each side.

    Returns ``latents`` (ascending, int64), ``below`` (log10 f <= lower, the never-fired ones included),
    ``above`` (log10 f >= upper) and ``never_fired``. Raises if no latent is in the band.
    """
    if tokens <= 0:
        raise ValueError("the frequency pass counted no tokens; give it contexts (frequency_tokens > 0)")
    log_freq = (fired.double() / tokens).log10().cpu()  # never fired: -inf
    inside = (log_freq > log_freq_lower) & (log_freq < log_freq_upper)
    never_fired = int((fired == 0).sum())
    below, above = int((log_freq <= log_freq_lower).sum()), int((log_freq >= log_freq_upper).sum())
    if not inside.any():
        raise ValueError(
            f"no latent has {log_freq_lower} < log10 f < {log_freq_upper} over {tokens} tokens: {below} at or below "
            f"{log_freq_lower} ({never_fired} of them never fired), {above} at or above {log_freq_upper}; widen the "
            "band (log_freq_lower / log_freq_upper) or count over more tokens (frequency_tokens)"
        )
    return {"latents": inside.nonzero().flatten(), "below": below, "above": above, "never_fired": never_fired}
