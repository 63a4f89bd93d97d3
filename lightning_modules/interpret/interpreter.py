"""LatentInterpreter: explain, simulate and score SAE latents with any Hugging Face causal LM.

    neurolight predict --config configs/interpret/demo.yaml
    neurolight predict --config configs/interpret/codellama-34b-deepspeed.yaml   # 4 GPUs, ZeRO-3

Per latent (a ``LatentTask`` from ``InterpretationDataModule``; ALGORITHMS.md §4):

1. explain: the explainer sees the top records as ``token<TAB>activation`` lines (activations scaled to 0-10) and
   completes "the main thing this neuron does is find"; greedy, cut to one line;
2. simulate: for every held-out record, the expected value 0-10 at each token, from the value tokens'
   probabilities in one forward pass (``simulator="logits"``) or parsed from generated lines (``"generate"``, the
   original's method, for comparison);
3. score: Pearson correlation of simulated and true activations over all token positions of the held-out records,
   position by position; with ``detection``, the balanced accuracy of Yes/No answers on activating against
   non-activating contexts.

``predict_step`` returns one dict per latent; ``neurolight.callbacks.InterpretationWriter`` stores them.

DeepSpeed ZeRO-3 shards the explainer's parameters, so every forward pass is a collective that all ranks must
enter: generation runs with ``synced_gpus``, the data module gives every rank the same number of batches, and after
each stage ranks agree (all-reduce max) on the number of forward passes, the ones with fewer running one-token
passes through the same modules.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from neurolight.datamodules.interpret.tasks import LatentTask
from neurolight.datamodules.llm.models import load_tokenizer, native_bfloat16, resolve_model
from neurolight.lightning_modules.interpret.prompts import (
    PromptBuilder,
    answer_token,
    clean_explanation,
    single_token_values,
)
from neurolight.lightning_modules.interpret.simulation import (
    balanced_accuracy,
    discretize,
    pad_left,
    pearson,
    read_logits,
    simulate_generate,
    simulate_logits,
    yes_probabilities,
)

SIMULATORS = ("logits", "generate")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LatentInterpreter(pl.LightningModule):
    def __init__(
        self,
        explainer_model: str = "smollm2-135m",
        max_explanation_tokens: int = 48,
        detection: bool = True,
        simulator: str = "logits",
        explainer_dtype: str | None = None,
        forward_batch_size: int = 8,
    ) -> None:
        """
        Args:
            explainer_model: Causal LM that explains and simulates: a short name (``neurolight.datamodules.MODELS``), a
                Hugging Face id or a local directory, with its (fast) tokenizer; its chat template is used when it
                has one (the original's ``--interpretation_model_name``).
            max_explanation_tokens: Longest explanation in tokens; generation also stops at the end of the first
                sentence or line.
            detection: Also compute the detection score (Yes/No on activating vs non-activating contexts).
            simulator: ``logits``: expected value from the value tokens' probabilities, one forward pass per record;
                ``generate``: the model writes ``token<TAB>value`` lines that are parsed (the original's method,
                several times slower; kept as the benchmark's baseline).
            explainer_dtype: Weights' dtype: ``float32``, ``bfloat16`` or ``float16``; ``auto`` = bfloat16 where the
                device computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX; 2.3x the float32 speed
                of a forward pass on a 2-core AVX512-BF16 CPU), else float32; null = the Trainer's precision
                (``bf16-true`` -> bfloat16, otherwise float32).
            forward_batch_size: Records (or detection contexts) per forward pass, padded to the longest.
        """
        super().__init__()
        if simulator not in SIMULATORS:
            raise ValueError(f"simulator='{simulator}' is unknown; choose one of {', '.join(SIMULATORS)}")
        if explainer_dtype is not None and explainer_dtype not in (*DTYPES, "auto"):
            raise ValueError(
                f"explainer_dtype='{explainer_dtype}' is unknown; choose one of {', '.join(DTYPES)}, auto or null"
            )
        for name, value in (
            ("max_explanation_tokens", max_explanation_tokens),
            ("forward_batch_size", forward_batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        self.save_hyperparameters()
        self.model = None
        self.tokenizer = None
        self.prompts: PromptBuilder | None = None
        self.value_ids: list[int] = []
        self.yes_id = self.no_id = -1

    # ------------------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = _load_explainer_tokenizer(self.hparams.explainer_model)
        self.value_ids = single_token_values(self.tokenizer)
        self.prompts = PromptBuilder(self.tokenizer, max_value=len(self.value_ids) - 1)
        probe = self.prompts.detection("anything", "some text")
        self.yes_id = answer_token(self.tokenizer, probe, "Yes")
        self.no_id = answer_token(self.tokenizer, probe, "No")
        if self.yes_id == self.no_id:
            raise ValueError(
                f"the explainer's tokenizer starts ' Yes' and ' No' with the same token (id {self.yes_id}), so the "
                "detection score cannot tell the answers apart; set detection: false or pick another explainer"
            )
        self.model = self._load_model().eval()
        self.model.requires_grad_(False)

    def _load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        dtype = self._explainer_dtype()
        # Under DeepSpeed stage 3 Lightning opened zero.Init around this hook; Hugging Face loads weights into the
        # partitioned parameters only when it knows the DeepSpeed config (as in SendModule).
        hf_ds_config = None
        if self._zero3():
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds_config = HfDeepSpeedConfig(self._trainer.strategy.config)  # kept alive: HF holds a weak reference
        try:
            return AutoModelForCausalLM.from_pretrained(resolve_model(self.hparams.explainer_model), dtype=dtype)
        finally:
            if hf_ds_config is not None:
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()

    def _explainer_dtype(self) -> torch.dtype:
        name = self.hparams.explainer_dtype
        if name is None:
            return torch.get_default_dtype()
        if name == "auto":
            # configure_model runs before the strategy moves the module: ask the strategy where it will run.
            device = self._trainer.strategy.root_device if self._trainer is not None else self.device
            return torch.bfloat16 if native_bfloat16(device) else torch.float32
        return DTYPES[name]

    def _zero3(self) -> bool:
        return self._trainer is not None and bool(getattr(self._trainer.strategy, "zero_stage_3", False))

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    # ---------------------------------------------------------------------------------------------------- steps
    def predict_step(self, batch: list[LatentTask], batch_idx: int = 0) -> list[dict]:
        """One dict per latent (padding tasks dropped): ``latent``, ``explanation``, ``score``, ``detection_score``,
        ``frequency``, ``max_activation``, ``top_tokens``, ``explainer``, ``num_simulated_tokens``."""
        explanations = self.explain(batch)
        simulated = self.simulate(batch, explanations)
        detection = self.detect(batch, explanations) if self.hparams.detection else [math.nan] * len(batch)
        results = []
        for task, explanation, values, detection_score in zip(batch, explanations, simulated, detection, strict=True):
            if task.padding:
                continue
            true = [record.activations for record in task.simulation]
            results.append(
                {
                    "latent": task.latent,
                    "explanation": explanation,
                    "score": pearson(torch.cat(true), torch.cat(values)) if true else math.nan,
                    "detection_score": detection_score,
                    "frequency": task.frequency,
                    "max_activation": task.max_activation,
                    "top_tokens": list(task.top_tokens),
                    "explainer": self.hparams.explainer_model,
                    "num_simulated_tokens": sum(len(record.tokens) for record in task.simulation),
                }
            )
        return results

    def explain(self, batch: list[LatentTask]) -> list[str]:
        """Explanations of the batch's latents, generated together (greedy, left padded)."""
        prompts = [
            self.prompts.explanation(
                task.explanation, [discretize(r.activations, task.max_activation).tolist() for r in task.explanation]
            )
            for task in batch
        ]
        ids, mask = pad_left(prompts, self.pad_id, self.device)
        generated = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.hparams.max_explanation_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.pad_id,
            stop_strings=["\n", ". "],  # clean_explanation keeps the first sentence of the first line
            tokenizer=self.tokenizer,
            synced_gpus=self._zero3(),
        )[:, ids.shape[1] :]
        return [clean_explanation(self.tokenizer.decode(row, skip_special_tokens=True)) for row in generated]

    def simulate(self, batch: list[LatentTask], explanations: list[str]) -> list[list[torch.Tensor]]:
        """Per latent, the simulated values (T,) of each held-out record."""
        size, generate = self.hparams.forward_batch_size, self.hparams.simulator == "generate"
        calls, simulated = 0, []
        for task, explanation in zip(batch, explanations, strict=True):
            prefix = self.prompts.simulation_prefix(explanation)
            if generate:
                starts = [self.prompts.generation_start(prefix)] * len(task.simulation)
                records = [record.tokens for record in task.simulation]
                values, n = simulate_generate(
                    self.model,
                    self.tokenizer,
                    starts,
                    records,
                    self.prompts.max_value,
                    self.pad_id,
                    size,
                    self._zero3(),
                )
            else:
                prompts = [self.prompts.simulation(prefix, record.tokens) for record in task.simulation]
                values, n = simulate_logits(self.model, prompts, self.value_ids, self.pad_id, size)
            simulated.append(values)
            calls += n
        self._even_out(calls, generate=generate)
        return simulated

    def detect(self, batch: list[LatentTask], explanations: list[str]) -> list[float]:
        """Per latent, the balanced accuracy of P(Yes) > P(No) against the contexts' labels."""
        calls, scores = 0, []
        for task, explanation in zip(batch, explanations, strict=True):
            prompts = [self.prompts.detection(explanation, "".join(record.tokens)) for record in task.detection]
            p_yes, n = yes_probabilities(
                self.model, prompts, self.yes_id, self.no_id, self.pad_id, self.hparams.forward_batch_size
            )
            scores.append(balanced_accuracy(p_yes > 0.5, torch.tensor(task.detection_labels, dtype=torch.bool)))
            calls += n
        self._even_out(calls)
        return scores

    def _even_out(self, calls: int, generate: bool = False) -> None:
        """Under ZeRO-3, run one-token passes until this rank has made as many as the busiest rank."""
        if not self._zero3() or self.trainer.world_size == 1:
            return
        busiest = int(self.trainer.strategy.reduce(torch.tensor(calls, device=self.device), reduce_op="max"))
        for _ in range(busiest - calls):
            if generate:  # synced_gpus keeps this call stepping until every rank's real generation has ended
                one = torch.full((1, 1), self.pad_id, device=self.device)
                self.model.generate(input_ids=one, max_new_tokens=1, pad_token_id=self.pad_id, synced_gpus=True)
            else:
                columns = torch.tensor(self.value_ids)
                read_logits(self.model, [[self.pad_id]], [[0]], columns, self.pad_id, batch_size=1)


def _load_explainer_tokenizer(name: str):
    path = resolve_model(name)
    try:
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"explainer_model '{name}' ({path}) has no loadable tokenizer ({type(error).__name__}: {error}); the "
            "explainer needs its tokenizer files (tokenizer.json, tokenizer_config.json) beside the weights"
        ) from error
    if tokenizer is None or isinstance(tokenizer, bool):
        raise ValueError(
            f"explainer_model '{name}' ({path}) has no tokenizer; save one beside the weights (tokenizer.json)"
        )
    return tokenizer
