"""neurolight-qa-scores: the comparison table of prediction files, its --help and its errors for bad files."""

from __future__ import annotations

import json

import pytest

from neurolight.cli.qa_scores import comparison_table, main

HEADER = ["file", "model", "num_questions", "exact_match", "f1", "mean_eigenscore", "eigenscore_auroc"]


@pytest.fixture
def before_after(tmp_path):
    paths = []
    for name, em, f1, auc in (("before", 0.0, 0.0125, None), ("after", 0.25, 0.3333, 0.75)):
        summary = {"num_questions": 4, "exact_match": em, "f1": f1, "eigenscore_auroc": auc}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"model_path": f"m-{name}", "aggregate": summary}))
        paths.append(path)
    return paths


def test_comparison_table__one_row_per_file_with_its_mean_scores(before_after):
    table = comparison_table(before_after).splitlines()
    assert table[0].split() == HEADER
    assert table[1].split() == ["before.json", "m-before", "4", "0.000", "0.013", "-", "-"]
    assert table[2].split() == ["after.json", "m-after", "4", "0.250", "0.333", "-", "0.750"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help__describes_the_comparison_table_and_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([flag])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.startswith("usage: neurolight-qa-scores [-h] PREDICTIONS.json [PREDICTIONS.json ...]")
    assert "comparison table of one or more prediction JSON files" in printed
    assert "exact match, token F1, mean EigenScore" in printed


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
        (json.dumps({"results": []}), "has no 'aggregate' scores"),
        (json.dumps([1, 2]), "has no 'aggregate' scores"),
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
