"""QAPredictionWriter: scores generated answers and writes them, with their aggregate, to one JSON file.

Works with any ``predict_step`` that returns, per question, a dict with ``index``, ``question_id``, ``question``,
``reference_answer``, ``answers`` (gold answers), ``prompt`` and ``generated_response``, optionally
``correct_answers`` / ``incorrect_answers`` (TruthfulQA), the detection scores of
``neurolight.lightning_modules.AnswerGenerator`` (``answer_eigenscore``, ``answer_ees``, ``perplexity``,
``ln_entropy``, ``lexical_similarity``, ``energy``) and a judge's ``judge_p_yes``.
The file holds ``model_path``, ``dataset``, ``generation_params`` and ``results`` (the user's schema), with
per-answer and mean scores, each answer's hallucination flag under every correctness label, and the detection
table (docs/send.md, Evaluating hallucination detection)::

    {"model_path": ..., "dataset": ..., "generation_params": {...}, "data": {...},
     "aggregate": {"num_questions", "exact_match", "f1", "rouge_l", ["truthfulqa_closer_to_correct"],
                   ["judge_p_yes"], ["mean_answer_eigenscore"],
                   "labels": {label: {"rule", "hallucinated", "correct"}},
                   "detection": {method: {label: {"auroc", "ci_low", "ci_high", "pearson", "n_hallucinated",
                                                  "n_correct", "note"}}},
                   "evaluation": {"min_class_size", "num_resamples", "level", "seed", "interval"}},
     "results": [{"question_id", "question", "reference_answer", "generated_response", "prompt", "answers",
                  "exact_match", "f1", "rouge_l", ["truthfulqa_closer_to_correct", "truthfulqa_margin"],
                  ["judge_p_yes"], "hallucinated": {label: bool}, "perplexity", "energy",
                  ["sampled_responses", "answer_eigenscore", "answer_ees", "ln_entropy", "lexical_similarity"]}]}

Under DDP every rank scores its own questions; the rows are gathered to rank 0, which writes every question once,
in test-split order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from neurolight.datamodules.files import atomic_path
from neurolight.lightning_modules.send.auroc_interval import INTERVALS
from neurolight.lightning_modules.send.detection_eval import METHODS, Settings, class_counts, detection_table
from neurolight.lightning_modules.send.qa_metrics import exact_match, rouge_l, token_f1, truthfulqa_margin

DEFAULT_OUTPUT = "predictions_{model}_{dataset}.json"


class Thresholds(NamedTuple):
    """The continuous scores at which an answer counts as correct (docs/send.md, Correctness labels)."""

    f1: float = 0.5
    """Token F1 at or above which an answer is correct."""
    rouge_l: float = 0.5
    """ROUGE-L at or above which an answer is correct."""


def label_rules(thresholds: Thresholds) -> dict[str, str]:
    """Label -> the rule that flags an answer as hallucinated, in words."""
    return {
        "f1": f"token F1 < {thresholds.f1}",
        "exact_match": "no exact match with a gold answer",
        "rouge_l": f"ROUGE-L < {thresholds.rouge_l}",
        "truthfulqa": "not closer to a correct than to every incorrect reference (token F1)",
        "judge": "the judge's P(Yes) < 0.5",
    }


def score_answer(row: dict, thresholds: Thresholds | None = None) -> dict:
    """The row without its ``index``, plus ``exact_match``, ``f1`` and ``rouge_l`` (0-1, best over the gold
    answers), TruthfulQA's ``truthfulqa_closer_to_correct`` and ``truthfulqa_margin`` where it has references, and
    ``hallucinated``: the answer's flag under every label it has. A row of an earlier version (``eigenscore``)
    gets the current name (``answer_eigenscore``); scoring twice gives the same row."""
    thresholds = thresholds or Thresholds()
    scored = {key: value for key, value in row.items() if key != "index"}
    for method, spec in METHODS.items():
        for legacy in spec.legacy_fields:
            if legacy in scored:
                scored.setdefault(method, scored.pop(legacy))
    for method in METHODS:
        value = scored.get(method)
        if value is not None and not math.isfinite(value):
            scored[method] = None  # a NaN embedding (e.g. an fp16 overflow) gives no score, not a broken file
    prediction, gold = row["generated_response"], row["answers"] or [row["reference_answer"]]
    scored["exact_match"] = exact_match(prediction, gold)
    scored["f1"] = token_f1(prediction, gold)
    scored["rouge_l"] = rouge_l(prediction, gold)
    flags = {
        "f1": scored["f1"] < thresholds.f1,
        "exact_match": scored["exact_match"] < 1,
        "rouge_l": scored["rouge_l"] < thresholds.rouge_l,
    }
    if row.get("correct_answers") and row.get("incorrect_answers"):
        margin = truthfulqa_margin(prediction, row["correct_answers"], row["incorrect_answers"])
        scored["truthfulqa_margin"], scored["truthfulqa_closer_to_correct"] = margin, margin > 0
        flags["truthfulqa"] = margin <= 0
    if scored.get("judge_p_yes") is not None:
        flags["judge"] = scored["judge_p_yes"] < 0.5
    scored["hallucinated"] = flags
    return scored


def aggregate(results: Sequence[dict], thresholds: Thresholds | None = None, settings: Settings | None = None) -> dict:
    """Means of the per-answer scores, the class counts of every label, and the detection table (``detection_eval``):
    per method and label the AUROC with its confidence interval, or the reason there is none, and the Pearson r."""
    thresholds, settings = thresholds or Thresholds(), settings or Settings()
    summary: dict = {"num_questions": len(results)}
    if not results:
        return summary
    for key in ("exact_match", "f1", "rouge_l", "truthfulqa_closer_to_correct", "judge_p_yes", "answer_eigenscore"):
        values = [float(r[key]) for r in results if r.get(key) is not None]
        if values:
            summary["mean_answer_eigenscore" if key == "answer_eigenscore" else key] = sum(values) / len(values)
    rules = label_rules(thresholds)
    labels = [name for name in rules if any(name in r.get("hallucinated", {}) for r in results)]
    summary["labels"] = {name: {"rule": rules[name], **class_counts(results, name)} for name in labels}
    summary["detection"] = detection_table(results, settings)
    summary["evaluation"] = settings._asdict()
    return summary


def merge_rank_rows(parts: Iterable[Sequence[dict]]) -> list[dict]:
    """Rows of every rank in ``index`` order, each index once (a sampler that pads ranks repeats questions)."""
    by_index: dict[int, dict] = {}
    for part in parts:
        for row in part:
            by_index.setdefault(int(row["index"]), row)
    return [by_index[i] for i in sorted(by_index)]


def _slug(name: str) -> str:
    """A file-name-safe form of a model name or path (its last component for a directory)."""
    path = Path(name)
    text = path.name if path.exists() or name.startswith((".", "/", "~")) else name
    return text.replace("/", "_") or "model"


class QAPredictionWriter(BasePredictionWriter):
    def __init__(
        self,
        output_file: str | None = None,
        hallucination_f1: float = 0.5,
        hallucination_rouge_l: float = 0.5,
        min_class_size: int = 10,
        bootstrap_resamples: int = 1000,
        confidence_level: float = 0.95,
        bootstrap_seed: int = 0,
        confidence_interval: str = "logit_delong",
    ) -> None:
        """
        Args:
            output_file: JSON file to write; ``{model}`` and ``{dataset}`` are filled in (model: the last part of
                the model path, or its name). Default: ``predictions_{model}_{dataset}.json`` in the Trainer's
                ``default_root_dir``.
            hallucination_f1: An answer with token F1 below this is hallucinated under the ``f1`` label.
            hallucination_rouge_l: An answer with ROUGE-L below this is hallucinated under the ``rouge_l`` label.
            min_class_size: Fewest hallucinated and fewest correct answers a label needs for an AUROC; below it the
                table says "not enough correct answers (n = 2, ...)" instead of a number.
            bootstrap_resamples: Stratified bootstrap resamples of each AUROC's confidence interval (the bootstrap
                methods of ``confidence_interval``).
            confidence_level: Level of the interval (0.95: a 95% interval).
            bootstrap_seed: Seed of the bootstrap, so that a file's intervals are reproducible.
            confidence_interval: How each AUROC's interval is computed: ``logit_delong`` (DeLong's variance on the
                logit scale, no resampling), ``bca`` (bias-corrected and accelerated bootstrap; the two covered the
                true AUROC best in simulation), ``percentile`` (bootstrap; narrow for high AUROCs and small
                classes) or ``delong`` (symmetric, pROC's default; narrower still). docs/send.md, Evaluating
                hallucination detection, gives the coverage of each.
        """
        super().__init__(write_interval="batch")
        self.output_file = output_file
        self.thresholds = Thresholds(hallucination_f1, hallucination_rouge_l)
        self.settings = Settings(
            min_class_size, bootstrap_resamples, confidence_level, bootstrap_seed, confidence_interval
        )
        if confidence_interval not in INTERVALS:
            raise ValueError(
                f"confidence_interval={confidence_interval!r} is not an interval method; choose one of "
                f"{', '.join(INTERVALS)}"
            )
        if min_class_size < 1:
            raise ValueError(f"min_class_size={min_class_size} must be at least 1")
        if bootstrap_resamples < 1 or not 0 < confidence_level < 1:
            raise ValueError(
                f"bootstrap_resamples={bootstrap_resamples} must be >= 1 and confidence_level={confidence_level} "
                "strictly between 0 and 1"
            )
        self._rows: list[dict] = []
        self.written: Path | None = None
        """The file of the last predict run (set on rank 0)."""
        self.summary: dict | None = None
        """The aggregate of the last predict run (set on rank 0)."""

    def on_predict_start(self, trainer, pl_module) -> None:
        self._rows = []

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int, dataloader_idx: int
    ) -> None:
        self._rows.extend(score_answer(row, self.thresholds) | {"index": row["index"]} for row in prediction)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        parts = [self._rows]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, self._rows)
        if trainer.is_global_zero:
            self.write(trainer, pl_module, merge_rank_rows(parts))

    def output_path(self, trainer, pl_module) -> Path:
        model = _slug(str(getattr(pl_module.hparams, "model_name", type(pl_module).__name__)))
        dataset = getattr(getattr(trainer.datamodule, "hparams", None), "dataset", "data")
        template = self.output_file or str(Path(trainer.default_root_dir) / DEFAULT_OUTPUT)
        return Path(template.format(model=model, dataset=dataset)).expanduser()

    def write(self, trainer, pl_module, rows: list[dict]) -> Path:
        results = [{key: value for key, value in row.items() if key != "index"} for row in rows]
        data_hparams = dict(getattr(trainer.datamodule, "hparams", {}) or {})
        summary = aggregate(results, self.thresholds, self.settings)
        summary["thresholds"] = self.thresholds._asdict()
        document = {
            "model_path": str(getattr(pl_module.hparams, "model_name", "")),
            "resolved_model_path": str(getattr(pl_module, "model_path", "")),
            "dataset": data_hparams.get("dataset"),
            "generation_params": {key: _plain(value) for key, value in pl_module.hparams.items()},
            "data": {
                key: _plain(data_hparams[key])
                for key in ("num_samples", "max_samples", "eval_split", "split_fractions", "seed", "max_length")
                if key in data_hparams
            }
            | {"chat_template": bool(getattr(trainer.datamodule, "chat_template_used", False))},
            "aggregate": summary,
            "results": results,
        }
        path = self.output_path(trainer, pl_module)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False, default=_plain)
        with atomic_path(path, "answers file") as temporary:
            temporary.write_text(text, encoding="utf-8")
        self.written, self.summary = path, summary
        print(f"\nwrote {len(results)} answers to {path}: {_format_summary(summary)}")
        return path


def _plain(value):
    """JSON-safe form of a hyperparameter or score (tuples become lists, NaN becomes null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
        return value
    return str(value)


def _format_summary(summary: dict) -> str:
    parts = [f"{key} {summary[key]:.3f}" for key in ("exact_match", "f1", "rouge_l") if summary.get(key) is not None]
    counts = [
        f"{name} {c['correct']} correct / {c['hallucinated']} hallucinated"
        for name, c in summary.get("labels", {}).items()
    ]
    return "; ".join([", ".join(parts), *counts]) if parts else "no answers"
