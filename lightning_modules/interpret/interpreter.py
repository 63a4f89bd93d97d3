"""LatentInterpreter: explain, simulate and score SAE latents with any Hugging Face causal LM.

    neurolight predict --config configs/interpret/demo.yaml
    neurolight predict --config configs/interpret/codellama-34b-deepspeed.yaml   # 4 GPUs, ZeRO-3

Per latent (a ``LatentTask`` from ``InterpretationDataModule``; docs/interpret.md):

1. explain: the explainer sees the top records as ``token<TAB>activation`` lines (activations scaled to 0-10) and
   completes "the main thing this neuron does is find"; greedy, cut to one line;
2. simulate: for every held-out record, the expected value 0-10 at each token, from the value tokens'
   probabilities in one forward pass (``simulator="logits"``) or parsed from generated lines (``"generate"``,
   generate-and-parse, the benchmark's baseline);
3. score: each of ``scorers`` (``neurolight.lightning_modules.interpret.scorers``; docs/interpret.md, Scorers)
   builds its prompts, the explainer's probabilities at them are read in batches (the expected value at every value
   slot, or P(Yes) of a Yes/No answer), and the scorer turns them into its fields: ``simulation`` the Pearson
   correlation of simulated and true activations over all measured token positions of the held-out records,
   ``detection`` the balanced accuracy of Yes/No answers (P(Yes) > 1/2) and the AUROC of P(Yes) on activating
   against non-activating contexts, ``fuzzing`` the same two on correctly against wrongly marked tokens in
   activating contexts.

``predict_step`` returns one dict per latent; ``neurolight.callbacks.InterpretationWriter`` stores them.

DeepSpeed ZeRO-3 shards the explainer's parameters, so every forward pass is a collective that all ranks must
enter: generation runs with ``synced_gpus``, the data module gives every rank the same number of batches, and after
each stage ranks agree (all-reduce max) on the number of forward passes, the ones with fewer running one-token
passes through the same modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from neurolight.datamodules.interpret.tasks import LatentTask
from neurolight.datamodules.llm import zero
from neurolight.datamodules.llm.models import (
    DTYPES,
    dtype_from_name,
    load_causal_lm,
    load_tokenizer,
    native_bfloat16,
    resolve_model,
)
from neurolight.datamodules.llm.padding import pad_left
from neurolight.lightning_modules.interpret.prompts import (
    PromptBuilder,
    answer_token,
    clean_explanation,
    single_token_values,
)
from neurolight.lightning_modules.interpret.scorers import DEFAULT_SCORERS, Scorer, build_scorers
from neurolight.lightning_modules.interpret.scorers.base import VALUES, YES_NO, yes_no_prompt
from neurolight.lightning_modules.interpret.simulation import (
    discretize,
    read_logits,
    simulate_generate,
    simulate_logits,
    yes_probabilities,
)

SIMULATORS = ("logits", "generate")


class LatentInterpreter(pl.LightningModule):
    def __init__(
        self,
        explainer_model: str = "smollm2-135m",
        max_explanation_tokens: int = 48,
        scorers: Sequence[str] = DEFAULT_SCORERS,
        simulator: str = "logits",
        explainer_dtype: str | None = None,
        forward_batch_size: int = 8,
    ) -> None:
        """
        Args:
            explainer_model: Causal LM that explains and simulates: a short name (``neurolight.datamodules.MODELS``), a
                Hugging Face id or a local directory, with its (fast) tokenizer; its chat template is used when it
                has one.
            max_explanation_tokens: Longest explanation in tokens; generation also stops at the end of the first
                sentence or line.
            scorers: Scores of each explanation, by name (``neurolight.lightning_modules.interpret.scorers.SCORERS``):
                ``simulation`` (correlation of simulated and true activations), ``detection`` (activating vs
                non-activating contexts), ``fuzzing`` (correctly vs wrongly marked tokens). Their fields become the
                store's columns and the feature browser's sort keys; the data module prepares their records
                (``num_detection_samples``, ``num_fuzzing_samples``).
            simulator: How the ``simulation`` scorer's values are read. ``logits``: expected value from the value
                tokens' probabilities, one forward pass per record;
                ``generate``: the model writes ``token<TAB>value`` lines that are parsed (several
                times slower; kept as the benchmark's baseline).
            explainer_dtype: Weights' dtype: ``float32``, ``bfloat16`` or ``float16``; ``auto`` = bfloat16 where the
                device computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX; 2.3x the float32 speed
                of a forward pass on a 2-core AVX512-BF16 CPU), else float32; null = the Trainer's precision
                (``bf16-true`` -> bfloat16, otherwise float32).
            forward_batch_size: Prompts (records, contexts) per forward pass, padded to the longest.
        """
        super().__init__()
        self.scorers: list[Scorer] = build_scorers(list(scorers))
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
        self._warned: set[str] = set()
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
        # Every Yes/No scorer's prompt ends like this probe (yes_no_prompt), so the answers start with these ids.
        probe = yes_no_prompt(self.prompts, "Answer Yes or No.", "Is this a question?")
        self.yes_id = answer_token(self.tokenizer, probe, "Yes")
        self.no_id = answer_token(self.tokenizer, probe, "No")
        yes_no = [scorer.name for scorer in self.scorers if scorer.readout == YES_NO]
        if yes_no and self.yes_id == self.no_id:
            raise ValueError(
                f"the explainer's tokenizer starts ' Yes' and ' No' with the same token (id {self.yes_id}), so the "
                f"scorers {', '.join(yes_no)} cannot tell the answers apart; drop them from scorers or pick another "
                "explainer"
            )
        self.model = self._load_model().eval()
        self.model.requires_grad_(False)

    def _load_model(self) -> torch.nn.Module:
        # Inside configure_model: under DeepSpeed stage 3 the weights load straight into partitioned parameters.
        strategy = self._trainer.strategy if self._trainer is not None else None
        return load_causal_lm(
            self.hparams.explainer_model, dtype=self._explainer_dtype(), device=None, strategy=strategy
        )

    def _explainer_dtype(self) -> torch.dtype:
        name = self.hparams.explainer_dtype
        if name is None:
            return torch.get_default_dtype()
        if name == "auto":
            # configure_model runs before the strategy moves the module: ask the strategy where it will run.
            device = self._trainer.strategy.root_device if self._trainer is not None else self.device
            return torch.bfloat16 if native_bfloat16(device) else torch.float32
        return dtype_from_name(name, "explainer_dtype")

    def _zero3(self) -> bool:
        return self._trainer is not None and zero.strategy_is_zero3(self._trainer.strategy)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    # ---------------------------------------------------------------------------------------------------- steps
    @property
    def scorer_names(self) -> list[str]:
        """Names of the scorers that run, in order: the writer records them beside the store's columns."""
        return [scorer.name for scorer in self.scorers]

    def predict_step(self, batch: list[LatentTask], batch_idx: int = 0) -> list[dict]:
        """One dict per latent (padding tasks dropped): ``latent``, ``explanation``, the fields of every scorer
        (``score``, ``detection_score``, ``detection_auroc``, ...), ``frequency``, ``max_activation``,
        ``top_tokens``, ``explainer``, ``num_simulated_tokens``."""
        explanations = self.explain(batch)
        scores: list[dict[str, float]] = [{} for _ in batch]
        for scorer in self.scorers:
            for row, values in zip(scores, self.score(scorer, batch, explanations), strict=True):
                row.update(values)
        results = []
        for task, explanation, row in zip(batch, explanations, scores, strict=True):
            if task.padding:
                continue
            results.append(
                {
                    "latent": task.latent,
                    "explanation": explanation,
                    **row,
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

    def score(self, scorer: Scorer, batch: list[LatentTask], explanations: list[str]) -> list[dict[str, float]]:
        """Per latent, ``scorer``'s fields: its prompts run through the explainer, its readout scored."""
        calls, scores = 0, []
        for task, explanation in zip(batch, explanations, strict=True):
            self._check_records(scorer, task)
            readings, n = self.read(scorer.readout, scorer.prompts(self.prompts, explanation, task))
            scores.append(scorer.score(readings, task))
            calls += n
        self._even_out(calls, generate=scorer.readout == VALUES and self.hparams.simulator == "generate")
        return scores

    def read(self, readout: str, prompts: list) -> tuple[list[torch.Tensor] | torch.Tensor, int]:
        """The explainer's ``readout`` at ``prompts`` (``scorers/base.py``), and the forward passes (or
        ``generate`` calls) it took: P(Yes) (N,) for ``yes_no``; for ``values``, the simulated value (T,) at every
        token of each ``SimulationPrompt``, read from the value tokens' probabilities, or generated and parsed with
        ``simulator="generate"``."""
        size = self.hparams.forward_batch_size
        if readout == YES_NO:
            return yes_probabilities(self.model, prompts, self.yes_id, self.no_id, self.pad_id, size)
        if self.hparams.simulator == "generate":
            starts = [self.prompts.generation_start(p.input_ids[: p.prefix_length]) for p in prompts]
            records = [p.tokens for p in prompts]
            max_value, zero3 = self.prompts.max_value, self._zero3()
            return simulate_generate(self.model, self.tokenizer, starts, records, max_value, self.pad_id, size, zero3)
        return simulate_logits(self.model, prompts, self.value_ids, self.pad_id, size)

    def _check_records(self, scorer: Scorer, task: LatentTask) -> None:
        """Warns once per scorer when a latent's task has none of the records the scorer reads (its score is NaN):
        the data module was told to prepare none."""
        empty = [name for name in scorer.records if not getattr(task, name)]
        if empty and not task.padding and scorer.name not in self._warned:
            self._warned.add(scorer.name)
            rank_zero_warn(
                f"scorer '{scorer.name}' found no {', '.join(empty)} records for latent {task.latent}, so its "
                f"score is NaN; InterpretationDataModule prepares them when "
                f"{', '.join(f'num_{name}_samples' for name in empty)} > 0"
            )

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
