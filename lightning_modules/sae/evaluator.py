"""SaeEvaluator: neurolight's SAE metrics for any SAE, from any format, on contexts of a tokenized corpus.

    neurolight validate --config configs/sae/validate.yaml --model.init_args.sae path/to/sae

The SAE keeps its own normalisation (folded into its weights on loading, docs/sae.md, Formats). Over the contexts
of ``CorpusContextDataModule``'s validation loader it reports L0, explained variance (1 - FVU over all tokens),
the dead and dense fractions of the latents (docs/sae.md, Metrics), and, with the reconstruction spliced into the
LLM, the clean / spliced / zero-ablated next-token CE, the CE loss recovered and the KL of the spliced
distribution. Each metric is pooled over all tokens of all ranks first, and the ratios taken from the pooled sums.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric

from neurolight.lightning_modules.sae.metrics import ExplainedVariance
from neurolight.lightning_modules.sae.site import load_site_llm, resolve_site
from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

_CES = ("ce_clean", "ce_spliced", "ce_zero", "kl")


class SaeEvaluator(pl.LightningModule):
    def __init__(
        self,
        sae: str,
        sae_name: str | None = None,
        model_name: str | None = None,
        layer_type: str | None = None,
        layer_id: int | None = None,
        hook_points: dict[str, str] | None = None,
        llm_dtype: str | None = None,
        exclude_first_position: bool | None = None,
        dense_log_freq: float = -1.0,
        splice: bool = True,
        report_path: str | None = None,
    ) -> None:
        """
        Args:
            sae: The SAE: a checkpoint of ``neurolight fit``, or a neurolight, SAELens or sparsify directory. Its
                metadata gives the LLM and site, the defaults of the arguments below.
            sae_name: The SAE of a sweep's checkpoint (``SparseAutoencoderSweep``) to evaluate, by its name.
            model_name: LLM whose activations the SAE encodes; default: the one it was trained on.
            layer_type: ``resid_pre``, ``resid_post``, ``attn_sublayer``, ``mlp_sublayer`` or ``mlp_activations``;
                default: the SAE's (an SAELens hook name such as ``blocks.15.hook_mlp_out`` is mapped).
            layer_id: Decoder layer of the site; default: the SAE's.
            hook_points: Module-path templates per site (``{mlp_sublayer: "transformer.h.{}.mlp"}``) for models
                with other module names; default: the SAE's, else Llama's.
            llm_dtype: ``float32``, ``bfloat16`` or ``float16`` LLM weights; default: the SAE's training dtype.
            exclude_first_position: Leave position 0 (BOS / attention sink) out of every metric and keep its clean
                activation when splicing; default: as the SAE was trained (True where it does not say).
            dense_log_freq: A latent is dense when log10 of its firing frequency over the evaluation exceeds this.
            splice: Also splice the reconstruction into the LLM for the CE and KL metrics (three more forwards
                per batch).
            report_path: Also write the metrics, the SAE's metadata and the token count to this JSON file.
        """
        super().__init__()
        self.save_hyperparameters()
        self.sae = SparseAutoencoder.from_pretrained(sae, sae_name).requires_grad_(False)
        self.settings = resolve_site(
            self.sae.metadata, sae, model_name, layer_type, layer_id, llm_dtype, exclude_first_position, hook_points
        )
        self.hooked_llm = None
        self.explained_variance = ExplainedVariance()
        self.l0 = MeanMetric()
        self.mse = MeanMetric()
        self.ce = nn.ModuleDict({name: MeanMetric() for name in _CES})  # moved with the module, reduced over ranks
        self.tokens = SumMetric()
        self.register_buffer("fired", torch.zeros(self.sae.d_sae, dtype=torch.long))

    def configure_model(self) -> None:
        if self.hooked_llm is None:
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            self.hooked_llm = load_site_llm(self.settings, device, self.sae.d_in, self.hparams.sae)

    def on_validation_epoch_start(self) -> None:
        self.fired.zero_()

    @torch.no_grad()
    def validation_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> None:
        input_ids = batch[1] if isinstance(batch, (tuple, list)) else batch
        skip_first = self.settings["exclude_first_position"]
        acts = self.hooked_llm.harvest(input_ids)
        if skip_first:
            acts = acts[:, 1:]
        x = acts.reshape(-1, acts.shape[-1]).to(self.device, self.sae.W_enc.dtype)
        latents = self.sae.encode(x)
        x_hat = self.sae.decode(latents)
        active = latents > 0
        self.fired += active.sum(0)
        self.tokens.update(len(x))
        self.l0.update(active.sum(-1).float())
        self.mse.update((x - x_hat).pow(2).sum(-1))
        self.explained_variance.update(x, x_hat)
        if self.hparams.splice:
            sae = self.sae
            splice = self.hooked_llm.splice_metrics(
                input_ids,
                lambda a: sae.decode(sae.encode(a.to(self.device, sae.W_enc.dtype))).to(a.device),
                skip_first_position=skip_first,
            )
            tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)  # each CE is a mean over the batch's tokens
            for name in _CES:
                self.ce[name].update(splice[name].to(self.device), tokens)

    def on_validation_epoch_end(self) -> None:
        fired = (
            self.trainer.strategy.reduce(self.fired.float(), reduce_op="sum")
            if self.trainer.world_size > 1
            else self.fired
        )
        tokens = float(self.tokens.compute())
        frequency = fired.float() / max(tokens, 1.0)
        metrics = {
            "eval/l0": self.l0.compute(),
            "eval/mse": self.mse.compute(),
            "eval/explained_variance": self.explained_variance.compute(),
            "eval/dead_fraction": (fired == 0).float().mean(),
            "eval/dense_fraction": (frequency > 10**self.hparams.dense_log_freq).float().mean(),
            "eval/tokens": torch.tensor(tokens),
        }
        if self.hparams.splice:
            ce = {name: self.ce[name].compute() for name in _CES}
            metrics.update({f"eval/{name}": value for name, value in ce.items()})
            # From the pooled means, not a mean of per-batch ratios (a batch with CE_zero near CE_clean would
            # dominate those).
            metrics["eval/ce_loss_recovered"] = (ce["ce_zero"] - ce["ce_spliced"]) / (ce["ce_zero"] - ce["ce_clean"])
        self.log_dict({name: value.float().to(self.device) for name, value in metrics.items()})
        for metric in (self.l0, self.mse, self.explained_variance, self.tokens, *self.ce.values()):
            metric.reset()
        if self.hparams.report_path and self.trainer.is_global_zero:
            self._write_report({name.removeprefix("eval/"): float(value) for name, value in metrics.items()})

    def _write_report(self, metrics: dict[str, float]) -> None:
        from neurolight.datamodules.files import atomic_path

        path = Path(self.hparams.report_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "sae": str(self.hparams.sae),
            "metadata": self.sae.metadata.to_dict(),
            "site": {
                key: self.settings[key] for key in ("model_name", "layer_type", "layer_id", "exclude_first_position")
            },
            "metrics": {name: (None if math.isnan(value) else value) for name, value in metrics.items()},
        }
        with atomic_path(path, "evaluation report") as temporary:
            temporary.write_text(json.dumps(report, indent=2) + "\n")
        print(f"evaluation report written to {path}")
