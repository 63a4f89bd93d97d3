"""neurolight-qa-scores runs/demo/send/predictions_before.json runs/demo/send/predictions_after.json"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def load_predictions(path: str | Path) -> dict:
    """A prediction file of ``QAPredictionWriter``; ValueError, naming the file, for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prediction file not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error}); expected a file written by QAPredictionWriter") from None
    if not isinstance(data, dict) or not isinstance(data.get("aggregate"), dict):
        raise ValueError(
            f"{path} has no 'aggregate' scores; expected a file written by QAPredictionWriter "
            "(neurolight predict --config configs/send/generate.yaml)"
        )
    return data


def comparison_table(paths: Sequence[str | Path]) -> str:
    """One row per prediction file (e.g. before and after fine-tuning): its model, questions and mean scores."""
    keys = ("num_questions", "exact_match", "f1", "mean_eigenscore", "eigenscore_auroc")
    rows = [("file", "model", *keys)]
    for path in paths:
        data = load_predictions(path)
        summary = data["aggregate"]
        cells = [f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in map(summary.get, keys)]
        rows.append((Path(path).name, str(data.get("model_path", "?")), *cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Sequence[str] | None = None) -> None:
    """neurolight-qa-scores BEFORE.json AFTER.json: print the scores of prediction files side by side."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="neurolight-qa-scores",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Print a comparison table of one or more prediction JSON files written by QAPredictionWriter\n"
            "(neurolight predict --config configs/send/generate.yaml), e.g. before and after SEND fine-tuning:\n"
            "one row per file with its model, number of questions, exact match, token F1, mean EigenScore and\n"
            "the EigenScore AUROC for detecting hallucinations ('-' where a file has none)."
        ),
        epilog="example:\n  neurolight-qa-scores runs/demo/send/predictions_before.json "
        "runs/demo/send/predictions_after.json",
    )
    parser.add_argument("predictions", nargs="+", metavar="PREDICTIONS.json", help="prediction files, one row each")
    args = parser.parse_args(argv)
    missing = [path for path in args.predictions if not Path(path).is_file()]
    if missing:
        parser.error(f"prediction file(s) not found: {', '.join(missing)}")
    try:
        print(comparison_table(args.predictions))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
