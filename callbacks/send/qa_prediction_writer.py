"""QAPredictionWriter: scores generated answers and writes them, with their aggregate, to one JSON file.

Works with any ``predict_step`` that returns, per question, a dict with ``index``, ``question_id``, ``question``,
``reference_answer``, ``answers`` (gold answers), ``prompt`` and ``generated_response``, optionally
``correct_answers`` / ``incorrect_answers`` (TruthfulQA) and ``eigenscore``
(``neurolight.lightning_modules.AnswerGenerator``).
The file holds ``model_path``, ``dataset``, ``generation_params`` and ``results``, with per-answer and mean scores
(docs/send.md, QA scores)::

    {"model_path": ..., "dataset": ..., "generation_params": {...}, "data": {...},
     "aggregate": {"num_questions", "exact_match", "f1", ["truthfulqa_closer_to_correct"],
                   ["mean_eigenscore", "eigenscore_auroc", "eigenscore_auroc_note", "num_hallucinated"]},
     "results": [{"question_id", "question", "reference_answer", "generated_response", "prompt", "answers",
                  "exact_match", "f1", ["truthfulqa_closer_to_correct"], ["sampled_responses", "eigenscore"]}]}

Under DDP every rank scores its own questions; the rows are gathered to rank 0, which writes every question once,
in test-split order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from neurolight.lightning_modules.send.qa_metrics import auroc, exact_match, token_f1, truthfulqa_closer_to_correct

DEFAULT_OUTPUT = "predictions_{model}_{dataset}.json"


def score_answer(row: dict) -> dict:
    """The row without its ``index``, plus ``exact_match`` and ``f1`` (0-1, best over the gold answers) and, when
    it has TruthfulQA references, ``truthfulqa_closer_to_correct``."""
    scored = {key: value for key, value in row.items() if key != "index"}
    prediction, gold = row["generated_response"], row["answers"] or [row["reference_answer"]]
    if "eigenscore" in scored and not math.isfinite(scored["eigenscore"]):
        scored["eigenscore"] = None  # a NaN embedding (e.g. an fp16 overflow) gives no score, not a broken file
    scored["exact_match"] = exact_match(prediction, gold)
    scored["f1"] = token_f1(prediction, gold)
    if row.get("correct_answers") and row.get("incorrect_answers"):
        scored["truthfulqa_closer_to_correct"] = bool(
            truthfulqa_closer_to_correct(prediction, row["correct_answers"], row["incorrect_answers"])
        )
    return scored


def aggregate(results: Sequence[dict], hallucination_f1: float = 0.5) -> dict:
    """Means of the per-answer scores; with EigenScores, the AUROC of EigenScore for detecting hallucinations,
    defined as answers with ``f1 < hallucination_f1`` (null, with the reason, when only one class occurs)."""
    summary: dict = {"num_questions": len(results)}
    if not results:
        return summary
    for key in ("exact_match", "f1", "truthfulqa_closer_to_correct"):
        values = [float(r[key]) for r in results if key in r]
        if values:
            summary[key] = sum(values) / len(values)
    scored = [r for r in results if r.get("eigenscore") is not None]
    if scored:
        scores = [r["eigenscore"] for r in scored]
        hallucinated = [r["f1"] < hallucination_f1 for r in scored]
        summary["mean_eigenscore"] = sum(scores) / len(scores)
        summary["num_hallucinated"] = sum(hallucinated)
        summary["hallucination_rule"] = f"f1 < {hallucination_f1}"
        if any(hallucinated) and not all(hallucinated):
            summary["eigenscore_auroc"] = auroc(scores, hallucinated)
            summary["eigenscore_auroc_note"] = None
        else:
            summary["eigenscore_auroc"] = None
            kind = "below" if all(hallucinated) else "at or above"
            summary["eigenscore_auroc_note"] = (
                f"undefined: all {len(scored)} answers have f1 {kind} {hallucination_f1}, and AUROC needs both "
                "hallucinated and correct answers"
            )
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
    def __init__(self, output_file: str | None = None, hallucination_f1: float = 0.5) -> None:
        """
        Args:
            output_file: JSON file to write; ``{model}`` and ``{dataset}`` are filled in (model: the last part of
                the model path, or its name). Default: ``predictions_{model}_{dataset}.json`` in the Trainer's
                ``default_root_dir``.
            hallucination_f1: An answer with token F1 below this counts as a hallucination when scoring
                EigenScore by AUROC.
        """
        super().__init__(write_interval="batch")
        self.output_file = output_file
        self.hallucination_f1 = hallucination_f1
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
        self._rows.extend(score_answer(row) | {"index": row["index"]} for row in prediction)

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
        summary = aggregate(results, self.hallucination_f1)
        document = {
            "model_path": str(getattr(pl_module.hparams, "model_name", "")),
            "resolved_model_path": str(getattr(pl_module, "model_path", "")),
            "dataset": data_hparams.get("dataset"),
            "generation_params": {key: _plain(value) for key, value in pl_module.hparams.items()},
            "data": {
                key: _plain(data_hparams[key])
                for key in ("num_samples", "max_samples", "eval_split", "split_fractions", "seed", "max_length")
                if key in data_hparams
            },
            "aggregate": summary,
            "results": results,
        }
        path = self.output_path(trainer, pl_module)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False, default=_plain))
        tmp.replace(path)
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
    parts = [
        f"{key} {summary[key]:.3f}" for key in ("exact_match", "f1", "eigenscore_auroc") if summary.get(key) is not None
    ]
    return ", ".join(parts) or "no answers"
