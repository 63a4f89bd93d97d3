"""QA records from FanOutQA, TriviaQA, TruthfulQA, CoQA and TyDiQA-GoldP, all in one shape.

``load_qa_records(dataset, data_path=None, split=None)`` reads the Hugging Face hub (or its cache), or a local copy
in the hub's schema: a JSON lines / JSON / Parquet file (taken as the requested split), a ``save_to_disk``
directory, or a directory of split-named files (``train-00000-of-00001.parquet``, as the hub stores them).
FanOutQA, the offline default, is read from the dev set that the PyPI package ``fanoutqa`` ships; its human
decompositions are flattened into single-answer factoid questions.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class QARecord:
    """One question with its gold answers; ``answer`` is the training target."""

    id: str
    """Unique within the data set (CoQA: ``coqa-{row}-{turn}``; FanOutQA: the sub-question's id)."""
    question: str
    answer: str
    """Training target: TriviaQA ``answer.value``, TruthfulQA ``best_answer``, CoQA this turn's
    ``answers.input_text[i]``, TyDiQA ``answers.text[0]``, FanOutQA the sub-question's answer."""
    answers: list[str]
    """Every gold answer, target first (TriviaQA value + aliases, TruthfulQA best + correct answers, TyDiQA all
    spans, FanOutQA the answers of every copy of the same sub-question)."""
    context: str | None = None
    """Passage the question is about (CoQA story, TyDiQA paragraph); None for closed-book sets."""
    group: str = ""
    """Records of one group (the turns of one CoQA story) always land in the same split; default: the id."""
    language: str | None = None
    """TyDiQA: the ``language`` field, else the id prefix (``finnish-...`` -> ``finnish``)."""
    category: str | None = None
    """TruthfulQA's category."""
    best_answer: str | None = None
    """TruthfulQA only."""
    correct_answers: list[str] = field(default_factory=list)
    """TruthfulQA only."""
    incorrect_answers: list[str] = field(default_factory=list)
    """TruthfulQA only."""

    def __post_init__(self) -> None:
        self.group = self.group or self.id


def _unique(values: Iterable[Any]) -> list[str]:
    """Non-empty stripped strings, first occurrence kept, order preserved."""
    out: dict[str, None] = {}
    for value in values:
        if value is None:
            continue
        text = str(value).strip()
        if text:
            out.setdefault(text, None)
    return list(out)


# ------------------------------------------------------------------------------------- row -> record converters
def _triviaqa(rows: Iterable[dict]) -> Iterator[QARecord]:
    for i, row in enumerate(rows):
        answer = row["answer"]
        value = str(answer["value"] or "").strip()
        aliases = answer.get("aliases") or answer.get("normalized_aliases") or []
        yield QARecord(
            id=str(row.get("question_id") or f"triviaqa-{i}"),
            question=row["question"],
            answer=value,
            answers=_unique([value, *aliases]),
        )


def _truthfulqa(rows: Iterable[dict]) -> Iterator[QARecord]:
    for i, row in enumerate(rows):
        best = str(row["best_answer"] or "").strip()
        correct = _unique(row["correct_answers"] or [])
        yield QARecord(
            id=f"truthfulqa-{i}",
            question=row["question"],
            answer=best,
            answers=_unique([best, *correct]),
            category=row.get("category"),
            best_answer=best,
            correct_answers=correct,
            incorrect_answers=_unique(row["incorrect_answers"] or []),
        )


def _coqa(rows: Iterable[dict]) -> Iterator[QARecord]:
    # One row per story; every turn is a question about it. Turns of a story share a group so that a story never
    # straddles the train/test boundary.
    for i, row in enumerate(rows):
        inputs = row["answers"]["input_text"]
        if len(inputs) != len(row["questions"]):
            raise ValueError(
                f"coqa row {i}: {len(row['questions'])} questions but {len(inputs)} answers.input_text entries"
            )
        for turn, (question, answer) in enumerate(zip(row["questions"], inputs)):
            answer = str(answer or "").strip()
            yield QARecord(
                id=f"coqa-{i}-{turn}",
                question=question,
                answer=answer,
                answers=_unique([answer]),
                context=row["story"],
                group=f"coqa-{i}",
            )


def _tydiqa(rows: Iterable[dict]) -> Iterator[QARecord]:
    for i, row in enumerate(rows):
        texts = _unique(row["answers"]["text"] or [])
        record_id = str(row.get("id") or f"tydiqa-{i}")
        language = row.get("language") or (record_id.split("-", 1)[0] if "-" in record_id else None)
        yield QARecord(
            id=record_id,
            question=row["question"],
            answer=texts[0] if texts else "",
            answers=texts,
            context=row["context"],
            language=language,
        )


@dataclass(frozen=True)
class QADatasetSpec:
    """Where a data set lives on the hub and which of its fields the loader reads."""

    hf_id: str | None
    config: str | None
    train_split: str
    """Split training records come from (TruthfulQA has only ``validation``; FanOutQA only ``dev``)."""
    required: tuple[str, ...]
    """Dotted field paths that must exist (``answer.value``)."""
    convert: Callable[[Iterable[dict]], Iterator[QARecord]] | None
    needs_context: bool = False
    """Whether its questions are meaningless without the passage (CoQA: "What did he do next?")."""


DATASETS: dict[str, QADatasetSpec] = {
    "fanoutqa": QADatasetSpec(None, None, "dev", ("question", "decomposition"), None),
    "triviaqa": QADatasetSpec(
        "mandarjoshi/trivia_qa", "rc.nocontext", "train", ("question", "answer.value", "answer.aliases"), _triviaqa
    ),
    "truthfulqa": QADatasetSpec(
        "truthfulqa/truthful_qa",
        "generation",
        "validation",
        ("question", "best_answer", "correct_answers", "incorrect_answers"),
        _truthfulqa,
    ),
    "coqa": QADatasetSpec(
        "stanfordnlp/coqa", None, "train", ("story", "questions", "answers.input_text"), _coqa, needs_context=True
    ),
    "tydiqa": QADatasetSpec(
        "google-research-datasets/tydiqa",
        "secondary_task",
        "train",
        ("id", "context", "question", "answers.text"),
        _tydiqa,
    ),
}
"""The supported data sets; FanOutQA (first) is the embedded, offline default."""


def dataset_spec(dataset: str) -> QADatasetSpec:
    if dataset not in DATASETS:
        raise ValueError(f"unknown QA dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


# -------------------------------------------------------------------------------------------------- loading
_OPTIONAL_COLUMNS = ("question_id", "category", "language")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _load_table(dataset: str, spec: QADatasetSpec, data_path: str | Path | None, split: str):
    """Return (datasets.Dataset, description of its source for error messages)."""
    import datasets

    if data_path is None:
        source = f"{spec.hf_id} (config {spec.config}, split {split})"
        try:
            return datasets.load_dataset(spec.hf_id, spec.config, split=split), source
        except Exception as error:  # offline, gated, missing split: all end in the same advice
            raise RuntimeError(
                f"could not load {dataset} from the Hugging Face hub or its cache: {source}: "
                f"{type(error).__name__}: {error}. Offline, pass data_path: a local copy in the hub's schema "
                "(JSON lines, Parquet, or a save_to_disk directory)"
            ) from error
    path = Path(data_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data_path {path} does not exist")
    if path.is_file():
        if path.suffix not in _FORMATS:
            raise ValueError(
                f"data_path {path}: unknown format '{path.suffix}'; expected .jsonl, .json, .parquet "
                "or a save_to_disk directory"
            )
        return datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train"), str(path)
    if any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} holds the splits {', '.join(loaded)}, not '{split}'")
            return loaded[split], f"{path} (split {split})"
        return loaded, str(path)
    files = sorted(f for f in path.rglob("*") if f.suffix in _FORMATS)
    chosen = [f for f in files if f.name.startswith(split) or split in f.relative_to(path).parts[:-1]]
    kinds = {_FORMATS[f.suffix] for f in chosen}
    if len(kinds) != 1:
        found = ", ".join(str(f.relative_to(path)) for f in files[:10]) or "none"
        raise FileNotFoundError(
            f"data_path {path} is not a save_to_disk directory and holds no (or mixed-format) '{split}*' "
            f".parquet/.jsonl/.json files for split '{split}' (files found: {found})"
        )
    table = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in chosen], split="train")
    return table, f"{path} (split {split})"


def _has_field(features: Any, dotted: str) -> bool:
    node = features
    for key in dotted.split("."):
        if not isinstance(node, dict):
            node = getattr(node, "feature", None)  # a Sequence/List of structs
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _check_fields(dataset: str, spec: QADatasetSpec, features: Any, source: str) -> None:
    for name in spec.required:
        if not _has_field(features, name):
            where = f"the Hugging Face schema of {spec.hf_id}" + (f" ({spec.config})" if spec.config else "")
            raise ValueError(
                f"{dataset}: field '{name}' is missing from {source} (its columns: {', '.join(features)}); "
                f"a local copy must keep {where}, which has {', '.join(spec.required)}"
            )


# ------------------------------------------------------------------------------------------------- FanOutQA
_FANOUT_FILES = {"dev": "fanout-final-dev.json"}


def fanoutqa_path(split: str = "dev") -> Path:
    """The JSON that the ``fanoutqa`` package ships (found without importing it: its __init__ needs spaCy)."""
    if split not in _FANOUT_FILES:
        raise ValueError(f"fanoutqa has one split with answers, 'dev'; got '{split}'")
    spec = importlib.util.find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded QA data set 'fanoutqa' needs the PyPI package fanoutqa: pip install --no-deps fanoutqa "
            "(only its bundled JSON is read), or pass data_path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / _FANOUT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"fanoutqa is installed but {path} is missing; reinstall the package")
    return path


def _fanout_answer(value: Any) -> str | None:
    """A single answer as text; None for enumerations (lists/dicts of several items) and empty answers."""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, dict)):
        items = list(value.values()) if isinstance(value, dict) else value
        return _fanout_answer(items[0]) if len(items) == 1 else None
    text = "" if value is None else str(value).strip()
    return text or None


def _fanout_leaves(nodes: list[dict], source: Path) -> Iterator[dict]:
    for node in nodes:
        for name in ("id", "question", "answer"):
            if name not in node:
                raise ValueError(f"fanoutqa: field 'decomposition[].{name}' is missing from {source}")
        children = node.get("decomposition") or []
        if children:
            yield from _fanout_leaves(children, source)
        else:
            yield node


def _fanoutqa_records(data_path: str | Path | None, split: str) -> list[QARecord]:
    """Flatten the decompositions: each leaf sub-question with a single answer is one record.

    Enumerations (answers that are lists or dicts of several items: "Who were the first 5 picks?") are not
    single-answer questions and are left out, as is the one empty answer of the dev set. Sub-questions shared
    by several top-level questions ("What is the capital of China?") appear once, with the answers of every
    copy, so that a question cannot sit in both the train and the test split.
    """
    path = Path(data_path).expanduser() if data_path is not None else fanoutqa_path(split)
    if not path.is_file():
        raise FileNotFoundError(f"fanoutqa data_path {path} is not a file (expected the package's JSON schema)")
    questions = json.loads(path.read_text())
    by_question: dict[str, QARecord] = {}
    for top in questions:
        for name in DATASETS["fanoutqa"].required:
            if name not in top:
                raise ValueError(f"fanoutqa: field '{name}' is missing from {path}")
        for leaf in _fanout_leaves(top["decomposition"], path):
            answer = _fanout_answer(leaf["answer"])
            question = str(leaf["question"]).strip()
            if not answer or not question:
                continue
            key = re.sub(r"\s+", " ", question.lower())
            if key in by_question:
                if answer not in by_question[key].answers:
                    by_question[key].answers.append(answer)
                continue
            by_question[key] = QARecord(id=str(leaf["id"]), question=question, answer=answer, answers=[answer])
    return list(by_question.values())


def download_qa_split(dataset: str, split: str | None = None) -> None:
    """Fill the Hugging Face cache with one split (nothing to do for the packaged FanOutQA)."""
    spec = dataset_spec(dataset)
    if spec.hf_id is not None:
        _load_table(dataset, spec, None, split or spec.train_split)


def load_qa_records(dataset: str, data_path: str | Path | None = None, split: str | None = None) -> list[QARecord]:
    """Every usable question of one split of a QA data set, in file order.

    Args:
        dataset: One of ``DATASETS``: ``fanoutqa``, ``triviaqa``, ``truthfulqa``, ``coqa``, ``tydiqa``.
        data_path: Local copy in the hub's schema (file, ``save_to_disk`` directory, or a directory of split-named
            files); FanOutQA: a JSON file in the package's schema. Default: the hub (or its cache) / the package.
        split: Split to read; default: the data set's training split (``train``; TruthfulQA ``validation``;
            FanOutQA ``dev``). A single local file is taken as this split whatever its name.

    Rows with an empty question or target answer (e.g. TriviaQA's unlabelled test split) are skipped with a warning.
    """
    spec = dataset_spec(dataset)
    split = split or spec.train_split
    if spec.convert is None:
        records, skipped = _fanoutqa_records(data_path, split), 0
        source = str(data_path or f"fanoutqa {split}")
    else:
        table, source = _load_table(dataset, spec, data_path, split)
        _check_fields(dataset, spec, table.features, source)
        # Only the columns read; TriviaQA's other columns are large.
        read = {name.split(".")[0] for name in spec.required} | set(_OPTIONAL_COLUMNS)
        table = table.select_columns([c for c in table.column_names if c in read])
        records, skipped = [], 0
        for record in spec.convert(table):
            if record.question.strip() and record.answer:
                records.append(record)
            else:
                skipped += 1
    if skipped:
        warnings.warn(
            f"{dataset}: skipped {skipped} questions with an empty question or answer in {source}", stacklevel=2
        )
    if not records:
        raise ValueError(f"{dataset}: no question with an answer in {source}")
    return records
