"""neurolight-qa-scores runs/demo/send/predictions_smollm2-135m_fanoutqa_base.json \\
    runs/demo/send/predictions_smollm2-135m_fanoutqa_plain.json \\
    runs/demo/send/predictions_smollm2-135m_fanoutqa.json --plot

Scores of prediction files side by side, and how well each hallucination detector separates hallucinated from
correct answers under each correctness label (docs/send.md, Evaluating hallucination detection). The table is
computed from the answers in each file, so a file written by an earlier version is read too: what it lacks (the
baselines, a judge label) is named under the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from neurolight.callbacks.send.qa_prediction_writer import Thresholds, score_answer
from neurolight.lightning_modules.send.auroc_interval import INTERVALS
from neurolight.lightning_modules.send.detection_eval import (
    BASELINES,
    LABELS,
    METHODS,
    Settings,
    class_counts,
    compare,
    detection_table,
    interval_text,
    method_scores,
)


def load_predictions(path: str | Path) -> dict:
    """A prediction file of ``QAPredictionWriter``; ValueError, naming the file, for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prediction file not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error}); expected a file written by QAPredictionWriter") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(
            f"{path} has no 'results' list of answers; expected a file written by QAPredictionWriter "
            "(neurolight predict --config configs/send/generate.yaml)"
        )
    return data


def scored_rows(data: dict) -> list[dict]:
    """The file's answers, each scored again under the file's own thresholds (an earlier version's file gains the
    labels it can compute from the texts: ROUGE-L, the flags)."""
    thresholds = Thresholds(**(data.get("aggregate", {}).get("thresholds") or {}))
    return [score_answer(row, thresholds) for row in data["results"]]


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _short_reason(cell: dict) -> str:
    note = cell["note"] or ""
    if note.startswith("not enough"):
        kind = "correct" if "correct" in note else "halluc."
        return f"n/a: {cell['n_correct' if kind == 'correct' else 'n_hallucinated']} {kind}"
    return "n/a"


def comparison_table(paths: Sequence[str | Path], settings: Settings | None = None) -> str:
    """The summary of every file (questions, EM, F1, ROUGE-L), then per file and detection method the AUROC with
    its interval under each label (with the class counts of the label), then the Pearson r, then what is missing."""
    settings = settings or Settings()
    files = []
    for path in paths:
        data = load_predictions(path)
        files.append((Path(path).name, data, scored_rows(data)))
    tables = {name: detection_table(rows, settings) for name, _, rows in files}
    summary = [("file", "model", "questions", "exact_match", "f1", "rouge_l", "judge_p_yes")]
    for name, data, rows in files:
        means = [_mean(rows, key) for key in ("exact_match", "f1", "rouge_l", "judge_p_yes")]
        summary.append((name, str(data.get("model_path", "?")), str(len(rows)), *map(_number, means)))
    labels = [label for label in LABELS if any(label in cells for t in tables.values() for cells in t.values())]
    auroc_rows = [("file", "method", *labels)]
    pearson_rows = [("file", "method", *labels)]
    notes = []
    for name, _, rows in files:
        counts = [class_counts(rows, label) for label in labels]
        auroc_rows.append((name, "correct / halluc.", *(f"{c['correct']} / {c['hallucinated']}" for c in counts)))
        for method, cells in tables[name].items():
            auroc_rows.append((name, METHODS[method].title, *(_auroc_cell(cells.get(label)) for label in labels)))
            pearson_rows.append(
                (name, METHODS[method].title, *(_number((cells.get(label) or {}).get("pearson")) for label in labels))
            )
        notes += _missing(name, rows, tables[name])
    refused = {
        f"{name}, {LABELS[label].title}: {cell['note']}"
        for name, table in tables.items()
        for cells in table.values()
        for label, cell in cells.items()
        if cell["note"] and cell["auroc"] is None
    }
    pointless = {
        f"{name}, {METHODS[method].title}, {LABELS[label].title}: {cell['note']}"
        for name, table in tables.items()
        for method, cells in table.items()
        for label, cell in cells.items()
        if cell["auroc"] is not None and cell["ci_low"] is None
    }
    text = [
        _table(summary),
        "",
        f"Hallucination detection AUROC [{settings.level:.0%} CI: {interval_title(settings)}]; "
        "positive class = hallucinated, 0.5 = chance:",
        _table(auroc_rows),
        "",
        "Pearson r of each method's confidence (its score negated) with the label's continuous correctness score:",
        _table(pearson_rows),
    ]
    paired = _paired_rows(files, labels, settings)
    if len(paired) > 1:
        text += [
            "",
            f"EigenScore minus each baseline, AUROC on the same answers [{settings.level:.0%} CI] and the two-sided p "
            "of DeLong's paired test:",
            _table(paired),
        ]
    if refused:
        text += ["", f"n/a: no AUROC where a class has fewer than {settings.min_class_size} answers:"]
        text += [f"  {note}" for note in sorted(refused)]
    if pointless:
        text += ["", "AUROCs without an interval:"]
        text += [f"  {cell}" for cell in sorted(pointless)]
    return "\n".join(text + (["", *notes] if notes else []))


def _paired_rows(files: list, labels: list[str], settings: Settings) -> list[tuple[str, ...]]:
    """Per file and baseline, EigenScore's AUROC minus the baseline's under each label (``detection_eval.compare``);
    files without EigenScore give no row."""
    rows = [("file", "EigenScore minus", *labels)]
    for name, _, answers in files:
        present = [
            m for m in ("answer_eigenscore", *BASELINES) if any(method_scores(r, m) is not None for r in answers)
        ]
        if present[:1] != ["answer_eigenscore"]:
            continue
        for baseline in present[1:]:
            cells = [compare(answers, "answer_eigenscore", baseline, label, settings) for label in labels]
            rows.append((name, METHODS[baseline].title, *map(_paired_cell, cells)))
    return rows


def _paired_cell(cell: dict) -> str:
    if cell["p_value"] is None:
        return _short_reason(cell)
    return f"{cell['difference']:+.3f} [{cell['ci_low']:+.2f}, {cell['ci_high']:+.2f}] p={cell['p_value']:.2f}"


def _mean(rows: list[dict], key: str) -> float | None:
    values = [float(row[key]) for row in rows if row.get(key) is not None]
    return sum(values) / len(values) if values else None


def _auroc_cell(cell: dict | None) -> str:
    if cell is None:
        return "-"
    if cell["auroc"] is None:
        return _short_reason(cell)
    return f"{cell['auroc']:.3f} {interval_text(cell)}"


def interval_title(settings: Settings) -> str:
    """How the intervals were computed, for a table caption."""
    method = INTERVALS[settings.interval]
    return f"{method.title}, {settings.num_resamples} resamples" if method.resampled else method.title


def _missing(name: str, rows: list[dict], table: dict) -> list[str]:
    """Lines naming what the file lacks, and why that may be."""
    notes = []
    absent = [METHODS[m].title for m in METHODS if m not in table]
    if absent:
        notes.append(
            f"{name}: no {', '.join(absent)} (written by an earlier version of neurolight, or predicted without "
            "num_generations >= 2 for the sampled-answer scores)"
        )
    if not any("judge" in row.get("hallucinated", {}) for row in rows):
        notes.append(f"{name}: no judge label (predicted without model.init_args.judge_model)")
    return notes


def main(argv: Sequence[str] | None = None) -> None:
    """neurolight-qa-scores A.json [B.json ...] [--plot]: the scores and detection tables of prediction files."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="neurolight-qa-scores",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Print the scores of one or more prediction JSON files written by QAPredictionWriter\n"
            "(neurolight predict --config configs/send/generate.yaml), e.g. of the base, plain fine-tuned and SEND\n"
            "models: per file its exact match, token F1 and ROUGE-L; then, per detection method (EigenScore,\n"
            "efficient EigenScore, perplexity, LN-entropy, lexical similarity, energy) and correctness label (F1,\n"
            "exact match, ROUGE-L, TruthfulQA, judge), the AUROC for detecting hallucinated answers with a\n"
            "confidence interval and the class counts, and the Pearson correlation. Where a label has fewer than\n"
            "--min_class_size correct or hallucinated answers it says so instead of giving an AUROC."
        ),
        epilog="example (make demo-send's base, plain and SEND answers):\n  neurolight-qa-scores "
        "runs/demo/send/predictions_smollm2-135m_fanoutqa_base.json \\\n    "
        "runs/demo/send/predictions_smollm2-135m_fanoutqa_plain.json \\\n    "
        "runs/demo/send/predictions_smollm2-135m_fanoutqa.json --plot",
    )
    parser.add_argument("predictions", nargs="+", metavar="PREDICTIONS.json", help="prediction files")
    defaults = Settings()
    parser.add_argument(
        "--min_class_size",
        type=int,
        default=defaults.min_class_size,
        help="fewest correct and fewest hallucinated answers a label needs for an AUROC (default: %(default)s)",
    )
    parser.add_argument(
        "--bootstrap_resamples",
        type=int,
        default=defaults.num_resamples,
        help="bootstrap resamples of each interval (bootstrap intervals only; default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="bootstrap seed (bootstrap intervals only; default: %(default)s)",
    )
    parser.add_argument(
        "--interval",
        choices=list(INTERVALS),
        default=defaults.interval,
        help="how each AUROC's confidence interval is computed; docs/send.md gives the coverage of each "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help="also write the ROC curves of every method under every label, one PNG per file, beside it (FILE_roc.png)",
    )
    args = parser.parse_args(argv)
    missing = [path for path in args.predictions if not Path(path).is_file()]
    if missing:
        parser.error(f"prediction file(s) not found: {', '.join(missing)}")
    if args.min_class_size < 1 or args.bootstrap_resamples < 1:
        parser.error("--min_class_size and --bootstrap_resamples must be at least 1")
    settings = Settings(args.min_class_size, args.bootstrap_resamples, defaults.level, args.seed, args.interval)
    try:
        print(comparison_table(args.predictions, settings))
        if args.plot:
            from neurolight.cli.qa_plots import plot_roc_curves

            for path in args.predictions:
                data = load_predictions(path)
                target = Path(path).with_name(Path(path).stem + "_roc.png")
                plot_roc_curves(scored_rows(data), target, title=f"{Path(path).name}: {data.get('model_path', '?')}",
                                settings=settings)  # fmt: skip
                print(f"ROC curves: {target}")
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
