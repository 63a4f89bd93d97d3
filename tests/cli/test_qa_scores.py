"""neurolight-qa-scores: the score and detection tables of prediction files (also of a file written by an earlier
version, naming what it lacks), the ROC plot, its --help and its errors for bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neurolight.cli.qa_scores import comparison_table, main
from neurolight.lightning_modules.send.auroc_comparison import compare_paired
from neurolight.lightning_modules.send.detection_eval import SEPARATED, auroc


def _answer(i: int, correct: bool, rng, old: bool = False) -> dict:
    row = {
        "question_id": f"q{i}",
        "question": "Capital of France?",
        "reference_answer": "Paris",
        "answers": ["Paris"],
        "prompt": "p",
        "generated_response": "Paris" if correct else "Lyon",
        "exact_match": float(correct),
        "f1": float(correct),
    }
    score = float(rng.normal(0 if correct else 1))
    if old:  # the fields of a file written before issue 15
        return row | {"eigenscore": score, "sampled_responses": ["Paris", "Lyon"]}
    return row | {"answer_eigenscore": score, "perplexity": float(rng.uniform(1, 3)), "energy": -5.0}


@pytest.fixture
def before_after(tmp_path):
    """An earlier version's file (EigenScore only, 2 correct of 12) and a current one (12 correct of 24)."""
    rng = np.random.default_rng(0)
    old = [_answer(i, i < 2, rng, old=True) for i in range(12)]
    new = [_answer(i, i % 2 == 0, rng) for i in range(24)]
    paths = []
    for name, rows in (("before", old), ("after", new)):
        path = tmp_path / f"{name}.json"
        path.write_text(
            json.dumps({"model_path": f"m-{name}", "aggregate": {"num_questions": len(rows)}, "results": rows})
        )
        paths.append(path)
    return paths


def test_comparison_table__scores_auroc_with_interval_and_refusal_per_file(before_after):
    text = comparison_table(before_after)
    lines = text.splitlines()
    assert lines[0].split() == ["file", "model", "questions", "exact_match", "f1", "rouge_l", "judge_p_yes"]
    assert lines[1].split() == ["before.json", "m-before", "12", "0.167", "0.167", "0.167", "-"]
    assert lines[2].split() == ["after.json", "m-after", "24", "0.500", "0.500", "0.500", "-"]
    before_rows = [line for line in lines if line.startswith("before.json  ")]
    assert any("EigenScore" in line and "n/a: 2 correct" in line for line in before_rows)
    assert "before.json, F1: not enough correct answers (n = 2, fewer than 10)" in text
    after = json.loads(before_after[1].read_text())["results"]
    expected = auroc([r["answer_eigenscore"] for r in after], [not r["f1"] for r in after])
    eigen = next(line for line in lines if line.startswith("after.json") and "  EigenScore  " in line)
    assert eigen.split()[2] == f"{expected:.3f}"  # F1 column: the AUROC, then its interval
    # The earlier version's file is read under the new names and says what it lacks.
    assert "before.json: no efficient EigenScore, perplexity, LN-entropy, lexical similarity, energy" in text
    assert "before.json: no judge label" in text


def test_main__plot_writes_one_png_of_roc_curves_per_file(before_after, capsys):
    main([*map(str, before_after), "--plot", "--bootstrap_resamples", "100"])
    out = capsys.readouterr().out
    for path in before_after:
        png = path.with_name(path.stem + "_roc.png")
        assert f"ROC curves: {png}" in out
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help__describes_the_comparison_table_and_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([flag])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.startswith("usage: neurolight-qa-scores [-h] [--min_class_size MIN_CLASS_SIZE]")
    assert "PREDICTIONS.json [PREDICTIONS.json ...]" in printed
    assert "Print the scores of one or more prediction JSON files" in printed
    assert "the AUROC for detecting hallucinated answers with a confidence interval" in printed
    assert "--interval {logit_delong,bca,percentile,delong}" in printed


def test_main__prints_the_table_of_the_files_given(before_after, capsys):
    main([str(path) for path in before_after])
    assert capsys.readouterr().out == comparison_table(before_after) + "\n"


def test_main__missing_files_are_all_named_in_a_usage_error(before_after, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(before_after[0]), str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: neurolight-qa-scores")
    assert f"error: prediction file(s) not found: {tmp_path / 'a.json'}, {tmp_path / 'b.json'}" in error


def test_main__no_file_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "the following arguments are required: PREDICTIONS.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("model_path: x\n", "is not JSON"),
        (json.dumps({"aggregate": {}}), "has no 'results' list of answers"),
        (json.dumps([1, 2]), "has no 'results' list of answers"),
    ],
)
def test_main__a_file_that_is_no_prediction_file_is_named_with_the_reason(text, reason, tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"error: {path} {reason}" in error and "QAPredictionWriter" in error


def test_main__interval_names_its_method_in_the_caption_and_changes_the_intervals(before_after, capsys):
    main([str(before_after[1])])
    default = capsys.readouterr().out
    assert "Hallucination detection AUROC [95% CI: DeLong, logit scale]" in default
    main([str(before_after[1]), "--interval", "bca", "--bootstrap_resamples", "300"])
    bca = capsys.readouterr().out
    assert "Hallucination detection AUROC [95% CI: BCa bootstrap, 300 resamples]" in bca
    row = [line for line in default.splitlines() if line.startswith("after.json") and "  EigenScore  " in line]
    bca_row = [line for line in bca.splitlines() if line.startswith("after.json") and "  EigenScore  " in line]
    assert row[0].split()[2] == bca_row[0].split()[2] and row != bca_row  # same AUROC, another interval


def test_comparison_table__a_perfectly_separated_label_shows_its_auroc_without_an_interval(tmp_path):
    rows = [
        {"generated_response": "x", "answers": ["x" if i < 12 else "y"], "reference_answer": "x",
         "perplexity": float(i)}
        for i in range(24)
    ]  # fmt: skip
    path = tmp_path / "separated.json"
    path.write_text(json.dumps({"model_path": "m", "results": rows}))
    text = comparison_table([path])
    perplexity = next(line for line in text.splitlines() if "  perplexity  " in line)
    assert perplexity.split()[2:4] == ["1.000", "[separated]"]
    assert f"AUROCs without an interval:\n  separated.json, perplexity, F1: {SEPARATED}" in text
    main([str(path), "--plot"])  # the legend says so too
    assert path.with_name("separated_roc.png").stat().st_size > 10_000


def test_comparison_table__eigenscore_minus_each_baseline_with_delongs_paired_test(before_after):
    text = comparison_table(before_after)
    assert "EigenScore minus each baseline, AUROC on the same answers [95% CI] and the two-sided p" in text
    rows = json.loads(before_after[1].read_text())["results"]
    labels = [not r["f1"] for r in rows]
    result = compare_paired(
        np.array([r["answer_eigenscore"] for r in rows]), np.array([r["perplexity"] for r in rows]), np.array(labels)
    )
    paired = text.split("DeLong's paired test:")[1].split("\n\n")[0].splitlines()
    line = next(line for line in paired if line.startswith("after.json") and "  perplexity  " in line)
    assert line.split()[2:6] == [
        f"{result.difference:+.3f}",
        f"[{result.low:+.2f},",
        f"{result.high:+.2f}]",
        f"p={result.p_value:.2f}",
    ]
    # energy is constant here (-5.0): its AUROC is 0.5 and the difference is EigenScore's AUROC minus 0.5
    energy = next(line for line in paired if line.startswith("after.json") and "  energy  " in line)
    assert energy.split()[2] == f"{auroc([r['answer_eigenscore'] for r in rows], labels) - 0.5:+.3f}"
    assert not [line for line in paired if line.startswith("before.json")]  # no EigenScore there
