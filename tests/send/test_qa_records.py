"""QA loaders (``load_qa_records``) on small local copies in each data set's real Hugging Face schema."""

from __future__ import annotations

import json

import pytest

from neurolight.datamodules.send.qa import QADataModule
from neurolight.datamodules.send.qa_records import load_qa_records
from tests.helpers.qa import coqa_rows, triviaqa_rows, truthfulqa_rows, tydiqa_rows, write_jsonl


def test_triviaqa__jsonl_in_hub_schema_gives_value_as_target_and_aliases_as_answers(tmp_path):
    records = load_qa_records("triviaqa", write_jsonl(tmp_path / "tqa.jsonl", triviaqa_rows(4)))
    assert [r.id for r in records] == ["tc_0", "tc_1", "tc_2", "tc_3"]  # rows, not column names
    assert records[2].question == "Which city is capital number 2?"
    assert records[2].answer == "Paris 2"
    assert records[2].answers == ["Paris 2", "City of Light 2"]
    assert records[2].context is None


def test_truthfulqa__parquet_keeps_best_correct_and_incorrect_answers(tmp_path):
    import datasets

    path = tmp_path / "validation-00000-of-00001.parquet"
    datasets.Dataset.from_list(truthfulqa_rows()).to_parquet(str(path))
    records = load_qa_records("truthfulqa", path)
    assert len(records) == 3
    record = records[0]
    assert record.answer == record.best_answer == "The seeds pass through your digestive system"
    assert record.answers == ["The seeds pass through your digestive system", "Nothing happens"]
    assert record.incorrect_answers == ["You grow watermelons in your stomach", "You get sick"]
    assert record.category == "Misconceptions"
    # A directory of split-named files as the hub stores them; TruthfulQA reads its validation split.
    assert [r.question for r in load_qa_records("truthfulqa", tmp_path)] == [r.question for r in records]


def test_coqa__save_to_disk_gives_one_record_per_turn_with_the_story(tmp_path):
    import datasets

    rows = coqa_rows()
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "coqa"))
    records = load_qa_records("coqa", tmp_path / "coqa")
    assert len(records) == 2 + 3 + 1
    assert [(r.question, r.answer) for r in records[:3]] == [
        ("Who runs?", "the cat"),
        ("What did it do then?", "jumps"),
        ("Where does the king live?", "in Paris"),
    ]
    assert records[3].context == rows[1]["story"]
    assert records[0].group == records[1].group != records[2].group
    assert len(load_qa_records("coqa", tmp_path / "coqa", split="validation")) == 2
    with pytest.raises(ValueError, match="train, validation"):
        load_qa_records("coqa", tmp_path / "coqa", split="test")


def test_tydiqa__goldp_jsonl_gives_language_from_the_id_prefix(tmp_path):
    records = load_qa_records("tydiqa", write_jsonl(tmp_path / "tydi.jsonl", tydiqa_rows()))
    assert [r.language for r in records] == ["english", "finnish", "swahili"]
    assert records[0].answer == "Paris" and records[0].answers == ["Paris"]
    assert records[0].context == "Paris is the capital of France."


def test_fanoutqa__packaged_dev_set_flattens_to_single_answer_questions():
    records = load_qa_records("fanoutqa")
    assert len(records) > 1000
    assert all(r.question.strip() and r.answer.strip() and r.answer == r.answers[0] for r in records)
    assert len({r.id for r in records}) == len({r.question.lower() for r in records}) == len(records)
    by_question = {r.question: r.answer for r in records}
    assert by_question["What is the batting hand of Pat Burrell?"] == "Right"
    assert by_question["What is the height of the Jaguar I-Pace in inches?"] == "61.6"


def test_fanoutqa__local_json_flattening_rules(tmp_path):
    def sub(id_, question, answer, decomposition=()):
        return {
            "id": id_,
            "question": question,
            "decomposition": list(decomposition),
            "answer": answer,
            "depends_on": [],
            "evidence": None,
        }

    questions = [
        {
            "id": "q1",
            "question": "Top?",
            "answer": {"a": 1, "b": 2},
            "categories": [],
            "decomposition": [
                sub("s1", "Who were the first 2 picks?", ["Pat Burrell", "Mark Mulder"]),  # enumeration: left out
                sub("s2", "What is the batting hand of Pat Burrell?", "Right"),
                sub("s3", "Was he born in Philadelphia?", False),
                sub("s4", "How many employees?", {"Apple": 161000}),
                sub("s5", "Population of the smallest?", {"x": 1}, [sub("s6", "What is the height of K2?", "8,611 m")]),
                sub("s7", "What is his birthday?", ""),
            ],
        },
        {
            "id": "q2",
            "question": "Top 2?",
            "answer": "x",
            "categories": [],
            "decomposition": [
                sub("s8", "What is the height of  K2?", 8611.0),  # same question: one record, both answers
            ],
        },
    ]
    path = tmp_path / "fanout.json"
    path.write_text(json.dumps(questions))
    records = load_qa_records("fanoutqa", path)
    assert [(r.id, r.answer) for r in records] == [("s2", "Right"), ("s3", "No"), ("s4", "161000"), ("s6", "8,611 m")]
    assert records[3].answers == ["8,611 m", "8611"]
    del questions[1]["decomposition"][0]["answer"]
    path.write_text(json.dumps(questions))
    with pytest.raises(ValueError, match=r"'decomposition\[\]\.answer'.*fanout\.json"):
        load_qa_records("fanoutqa", path)


def test_missing_field__error_names_the_field_and_the_file(tmp_path):
    rows = triviaqa_rows(3)
    for row in rows:
        del row["answer"]["value"]
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(ValueError, match=r"'answer\.value'.*broken\.jsonl"):
        load_qa_records("triviaqa", path)


def test_unknown_dataset__lists_the_choices():
    with pytest.raises(ValueError, match="fanoutqa, triviaqa, truthfulqa, coqa, tydiqa"):
        load_qa_records("squad")
    with pytest.raises(ValueError, match="choose one of fanoutqa"):
        QADataModule(dataset="squad")


def test_hub_load__uses_real_ids_and_offline_failure_says_pass_data_path(monkeypatch):
    import datasets

    calls = []

    def offline(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("triviaqa", "truthfulqa", "coqa", "tydiqa"):
        with pytest.raises(RuntimeError, match="pass data_path"):
            load_qa_records(name)
    assert calls == [
        ("mandarjoshi/trivia_qa", "rc.nocontext", "train"),
        ("truthfulqa/truthful_qa", "generation", "validation"),
        ("stanfordnlp/coqa", None, "train"),
        ("google-research-datasets/tydiqa", "secondary_task", "train"),
    ]
