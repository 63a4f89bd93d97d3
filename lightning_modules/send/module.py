"""SendModule: causal-LM fine-tuning on a QADataModule, the model the SEND callback drops neurons in.

neurolight fit --config configs/send/demo.yaml

The module itself is plain fine-tuning (AdamW, loss on the answer tokens); Sensitive Neuron Dropout
(``neurolight.callbacks.SensitiveNeuronDropout``) is a callback added to the trainer, so the same module without it is
the
plain fine-tuning baseline. At the end of fit the model is written as ``{output_dir}/{model}_{dataset}_SEND/``:
Hugging Face weights (safetensors), tokenizer files and ``training_config.json``; rank 0 prints the folder's
absolute path.

Also here, importable without Lightning running: the SEND math (``sentence_embeddings``, ``sensitivity_scores``)
and ``penultimate_layer``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from neurolight.datamodules.llm import zero
from neurolight.datamodules.llm.models import MODELS, load_causal_lm, resolve_model
from neurolight.lightning_modules.send.prefix_cache import FrozenPrefixCache, check_cacheable_prefix

TRAINING_CONFIG = "training_config.json"


# ------------------------------------------------------------------------------------------------ SEND math
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers`` for Llama, Mistral, Qwen)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layer list (expected model.model.layers)")
    return layers


def penultimate_layer(model: nn.Module) -> nn.Module:
    """The decoder layer whose output is Hugging Face's ``hidden_states[-2]``: ``layers[-2]``.

    ``hidden_states`` holds num_layers + 1 entries: the embeddings, then the output of each layer, except that the
    last entry is the final-normed output of the last layer. So ``hidden_states[-2]`` is the raw residual stream
    after layer num_layers - 2 (0-based), the layer SEND drops neurons in.
    """
    layers = decoder_layers(model)
    if len(layers) < 2:
        raise ValueError(f"SEND needs at least 2 decoder layers; {type(model).__name__} has {len(layers)}")
    return layers[-2]


def sentence_embeddings(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """SEND's sentence embedding (paper Def. 3.1): 1/2 (mean over real tokens + the last real token).

    Args:
        hidden: (batch, seq, d) hidden states of the penultimate layer.
        attention_mask: (batch, seq), 1 on real tokens; padding on either side is excluded.

    Returns:
        (batch, d) float32.
    """
    hidden = hidden.float()
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    seq = attention_mask.shape[1]
    last = seq - 1 - attention_mask.flip(1).argmax(1)  # index of the last 1: right or left padding alike
    return 0.5 * (mean + hidden[torch.arange(len(hidden), device=hidden.device), last])


def sensitivity_scores(history: Tensor, num_checkpoints: int = 3) -> Tensor:
    """Per-dimension sensitivity of the tracking embeddings (SEND paper Def. 3.2-3.3; docs/send.md, Sensitivity).

    For every tracking sample n and dimension j: V[n, j] = Var_t(E[t, n, j]) (over all T checkpoints, population
    variance) * sum of |E[t, n, j] - E[t-1, n, j]| over the last ``num_checkpoints`` net changes (all of them when
    fewer exist); the score of j is V[:, j] averaged over the samples.

    Args:
        history: (T, N, d) tracking embeddings, one (N, d) matrix per checkpoint, oldest first; T >= 2.
        num_checkpoints: C, the number of most recent net changes summed (C = 3 in the paper).

    Returns:
        (d,) float32 scores; the largest are the most sensitive dimensions.
    """
    if history.ndim != 3 or len(history) < 2:
        raise ValueError(f"need a (T >= 2, N, d) embedding history, got shape {tuple(history.shape)}")
    if num_checkpoints < 1:
        raise ValueError(f"num_checkpoints must be >= 1, got {num_checkpoints}")
    h = history.double()
    variance = h.var(0, unbiased=False)
    net_change = (h[1:] - h[:-1]).abs()[-num_checkpoints:].sum(0)
    return (variance * net_change).mean(0).float()


def select_sensitive(scores: Tensor, fraction: float) -> Tensor:
    """Indices (sorted, int64) of the top ``fraction`` of ``scores`` (at least one)."""
    if not 0 < fraction < 1:
        raise ValueError(f"sensitivity_threshold={fraction} must lie strictly between 0 and 1 (0.3 = top 30%)")
    k = max(1, round(fraction * len(scores)))
    return torch.topk(scores, k).indices.sort().values


@torch.no_grad()
def logits_are_head_of_hidden(model: nn.Module) -> bool:
    """Whether ``model``'s logits are its output embedding applied to its decoder's last hidden state, checked on a
    3-token probe: true for Llama, Mistral and Qwen; false where a soft-cap or logit scale follows the head."""
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    if head is None or decoder is None:
        return False
    ids = torch.arange(1, 4, device=head.weight.device).unsqueeze(0) % model.config.vocab_size
    was_training = model.training
    model.eval()
    try:
        full = model(input_ids=ids, use_cache=False).logits
        hidden = getattr(decoder(input_ids=ids, use_cache=False), "last_hidden_state", None)
        ours = None if hidden is None else head(hidden)
    finally:
        model.train(was_training)
    # The same kernels on the same shapes: equal bit for bit where the logits are plainly head(hidden).
    return ours is not None and full.shape == ours.shape and torch.equal(full, ours)


# ------------------------------------------------------------------------------------------------- module
class SendModule(pl.LightningModule):
    def __init__(
        self,
        model_name: str = "smollm2-135m",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        freeze_layers: int = 0,
        freeze_embeddings: bool = False,
        gradient_checkpointing: bool = False,
        cache_frozen_prefix: bool = False,
        output_dir: str = "output",
        run_name: str | None = None,
        overwrite: bool = False,
        save_model: bool = True,
        stochastic_rounding: bool = True,
        rounding_seed: int = 0,
    ) -> None:
        """
        Args:
            model_name: Model to fine-tune: a short name (``llama2-7b``, ``llama3.1-8b``, ``vicuna-7b``,
                ``smollm2-135m``, the embedded offline default), a Hugging Face id or a local directory. Set
                ``data.init_args.model_name`` to the same value (the tokenizer must be the model's; checked).
                Loaded in the trainer's precision (``bf16-true``: bfloat16 weights; ``32-true``: float32).
            learning_rate: AdamW learning rate.
            weight_decay: AdamW (decoupled) weight decay.
            adam_betas: AdamW betas.
            freeze_layers: Freeze the first N decoder layers; 0: none.
            freeze_embeddings: Also freeze the input embeddings (with tied embeddings, the LM head too); with
                ``freeze_layers`` this skips the backward pass through the frozen layers altogether.
            gradient_checkpointing: Recompute activations in the backward pass (less memory, ~30% more time).
            cache_frozen_prefix: Keep the input of layer ``freeze_layers`` for every training and validation
                sequence the first time it is computed, so later epochs run only the trainable layers (the SEND
                demo: 4 of 30 layers). Needs ``freeze_embeddings`` and a prefix without dropout; not under ZeRO-3.
                Costs ``tokens x hidden size`` values of CPU memory (docs/send.md, Fine-tuning cost).
            output_dir: Where the fine-tuned model is written at the end of fit, as
                ``{output_dir}/{run_name}``.
            run_name: Folder name; default ``{model}_{dataset}_SEND`` (model: the short name, else the last part
                of the id or path; dataset: the datamodule's ``dataset``).
            overwrite: Replace an existing output folder. Without it, fit refuses to start when it exists.
            save_model: Write the model at the end of fit (off for benchmarks and tests of training alone).
            stochastic_rounding: With bfloat16 / float16 weights (``bf16-true``), compute each AdamW step in float32
                and write the weights and second moments back with stochastic rounding
                (``neurolight.lightning_modules.send.stochastic_rounding``), so updates smaller than bfloat16's
                spacing accumulate
                instead of rounding away. False: torch's AdamW, which rounds to nearest. No effect on float32
                weights (``32-true``, ``bf16-mixed``, DeepSpeed).
            rounding_seed: Seed of the stochastic rounding's random bits (the same on every rank, so DDP replicas stay
                identical).
        """
        super().__init__()
        if freeze_layers < 0:
            raise ValueError(f"freeze_layers={freeze_layers} must be >= 0")
        self.save_hyperparameters()
        self.model: nn.Module | None = None
        self.prefix_cache: FrozenPrefixCache | None = None
        self.head_on_labels_only = False  # set by configure_model (see loss)

    # ---------------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        # from_pretrained returns eval mode, and Lightning keeps the mode it finds: train mode here.
        self.model = self._load_model().train()
        layers = decoder_layers(self.model)
        n = self.hparams.freeze_layers
        if n > len(layers):
            raise ValueError(
                f"freeze_layers={n} but {self.hparams.model_name} has only {len(layers)} decoder layers; "
                f"choose 0-{len(layers)}"
            )
        frozen = list(layers[:n])
        if self.hparams.freeze_embeddings:
            frozen.append(self.model.get_input_embeddings())
        for module in frozen:
            module.requires_grad_(False)
        self.model.config.use_cache = False
        if self.hparams.gradient_checkpointing:
            # Non-reentrant: with frozen embeddings the checkpointed inputs need no grad, which reentrant mishandles.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.hparams.cache_frozen_prefix:
            check_cacheable_prefix(self.model, layers, n)
            self.prefix_cache = FrozenPrefixCache(n)
        # Under ZeRO-3 the parameters are partitioned here and cannot run a probe: Hugging Face's forward then.
        if not any(zero.zero_stage(p) == 3 for p in self.model.parameters()):
            self.head_on_labels_only = logits_are_head_of_hidden(self.model)

    def _load_model(self) -> nn.Module:
        # Inside configure_model Lightning has set the default dtype to the trainer's precision (bf16-true ->
        # bfloat16) and, under DeepSpeed stage 3, opened zero.Init.
        strategy = self._trainer.strategy if self._trainer is not None else None
        return load_causal_lm(self.hparams.model_name, dtype=torch.get_default_dtype(), device=None, strategy=strategy)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_model = getattr(getattr(datamodule, "hparams", None), "model_name", None)
        if data_model is not None and resolve_model(data_model) != resolve_model(self.hparams.model_name):
            raise ValueError(
                f"the data is tokenized for '{data_model}' but the model is '{self.hparams.model_name}'; set "
                f"data.init_args.model_name: {self.hparams.model_name}"
            )
        if stage == "fit" and self.hparams.save_model:
            target = self.output_path()
            exists = self.trainer.strategy.broadcast(target.exists(), src=0)
            if exists and not self.hparams.overwrite:
                raise FileExistsError(
                    f"output folder {target} already exists; choose another model.init_args.output_dir or run_name, "
                    "or set model.init_args.overwrite: true to replace it"
                )

    def output_path(self) -> Path:
        """``{output_dir}/{run_name}``, default run name ``{model}_{dataset}_SEND``."""
        hp = self.hparams
        if hp.run_name:
            return Path(hp.output_dir) / hp.run_name
        model = hp.model_name if hp.model_name in MODELS else Path(hp.model_name.rstrip("/")).name
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        dataset = getattr(getattr(datamodule, "hparams", None), "dataset", None) or "data"
        return Path(hp.output_dir) / f"{model}_{dataset}_SEND"

    # ------------------------------------------------------------------------------------------- training
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Hugging Face's causal-LM loss (mean cross-entropy of the tokens whose label is not -100) on a right-padded
        training or validation batch, through the prefix cache if on.

        The LM head runs only where a label is kept, i.e. on the answer tokens, not on every position: for SmolLM2
        (a 49152-token vocabulary) the head cost as much as the 4 trained layers of the demo (docs/send.md,
        Fine-tuning cost). Models whose logits are not plainly the head of the last hidden state take Hugging
        Face's own forward instead (``logits_are_head_of_hidden``).
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        cache = self.prefix_cache
        skip = nullcontext() if cache is None else cache.around(decoder_layers(self.model), input_ids, attention_mask)
        with skip:
            if not self.head_on_labels_only:
                return self(**batch).loss
            decoder = self.model.get_decoder()
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]  # position t predicts token t + 1
        kept = targets != -100
        logits = self.model.get_output_embeddings()(hidden[:, :-1][kept])
        return F.cross_entropy(logits.float(), targets[kept])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["input_ids"]))

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("every parameter is frozen; lower freeze_layers or unset freeze_embeddings")
        hp = self.hparams
        settings = {"lr": hp.learning_rate, "betas": tuple(hp.adam_betas), "weight_decay": hp.weight_decay}
        if hp.stochastic_rounding and any(p.dtype in (torch.bfloat16, torch.float16) for p in params):
            from neurolight.lightning_modules.send.stochastic_rounding import StochasticRoundingAdamW

            return StochasticRoundingAdamW(params, seed=hp.rounding_seed, **settings)
        return torch.optim.AdamW(params, **settings)

    # -------------------------------------------------------------------------------------------- writing
    def on_train_end(self) -> None:
        # on_train_end, not on_fit_end: the strategy (and DeepSpeed's partitioned parameters) is still up.
        if self.hparams.save_model:
            self.save_model(self.output_path())

    def save_model(self, target: Path) -> None:
        """Write the model (safetensors), its tokenizer and ``training_config.json`` to ``target``.

        Collective under DeepSpeed stage 3 (every rank gathers the parameters); rank 0 writes, into a staging
        folder that is renamed at the end, so an interrupted write never leaves half a model, and prints the
        folder's absolute path.
        """
        state = self._full_state_dict()
        if not self.trainer.is_global_zero:
            self.trainer.strategy.barrier("send_save_model")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            self.model.save_pretrained(staging, state_dict=state, safe_serialization=True)
            self._tokenizer().save_pretrained(staging)
            (staging / TRAINING_CONFIG).write_text(json.dumps(self.training_config(), indent=2, default=str))
            if target.exists():
                if not self.hparams.overwrite:
                    raise FileExistsError(f"output folder {target} appeared during training; set overwrite: true")
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"\nSEND model written to {target.resolve()}")
        self.trainer.strategy.barrier("send_save_model")

    def _full_state_dict(self) -> dict[str, Tensor]:
        """Whole tensors on CPU (rank 0's copy; under ZeRO-3 each parameter is gathered in turn)."""
        state = self.model.state_dict()
        params = dict(self.model.named_parameters(remove_duplicate=False))  # tied weights under both names
        if not any(zero.zero_stage(p) == 3 for p in params.values()):
            return {name: value.detach().cpu() for name, value in state.items()}
        import deepspeed

        full = {}
        for name, value in state.items():
            if name not in params:  # a persistent buffer: whole on every rank
                full[name] = value.detach().cpu()
                continue
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=None):
                if self.trainer.is_global_zero:
                    full[name] = params[name].detach().cpu().clone()
        return full

    def _tokenizer(self):
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            from neurolight.datamodules.llm.models import load_tokenizer

            tokenizer = load_tokenizer(self.hparams.model_name)
        return tokenizer

    def training_config(self) -> dict:
        """Every setting of the run: module, data, trainer, callbacks and (under the CLI) the whole config."""
        import lightning
        import transformers
        from lightning.pytorch.cli import SaveConfigCallback

        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        config = {
            "model": {"class_path": f"{type(self).__module__}.{type(self).__name__}", **dict(self.hparams)},
            "resolved_model": resolve_model(self.hparams.model_name),
            "data": dict(datamodule.hparams) if datamodule is not None else None,
            "trainer": {
                "max_epochs": trainer.max_epochs,
                "epochs_trained": trainer.current_epoch,
                "global_step": trainer.global_step,
                "precision": trainer.precision,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "gradient_clip_val": trainer.gradient_clip_val,
                "strategy": type(trainer.strategy).__name__,
                "optimizer": type(trainer.optimizers[0]).__name__ if trainer.optimizers else None,
                "world_size": trainer.world_size,
                "num_nodes": trainer.num_nodes,
            },
            "callbacks": {
                type(cb).__name__: dict(cb.hparams)
                for cb in trainer.callbacks
                if isinstance(cb.__dict__.get("hparams"), dict)
            },
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "lightning": lightning.__version__,
            },
        }
        for callback in trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):
                import yaml

                config["cli_config"] = yaml.safe_load(callback.parser.dump(callback.config, skip_none=False))
        return config
