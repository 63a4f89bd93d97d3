"""QA loaders on small local copies in each data set's real Hugging Face schema, and the QADataModule."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from datamodules.qa import QADataModule, split_records
from datamodules.qa_records import DATASETS, QARecord, load_qa_records

_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _triviaqa_rows(n: int = 4) -> list[dict]:
    # rc.nocontext: entity_pages and search_results are present but empty.
    return [
        {
            "question": f"Which city is capital number {i}?",
            "question_id": f"tc_{i}",
            "question_source": "http://www.quiz.example/",
            "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
            "search_results": {
                "description": [],
                "filename": [],
                "rank": [],
                "title": [],
                "url": [],
                "search_context": [],
            },
            "answer": {
                "aliases": [f"Paris {i}", f"City of Light {i}"],
                "normalized_aliases": [f"paris {i}", f"city of light {i}"],
                "matched_wiki_entity_name": "",
                "normalized_matched_wiki_entity_name": "",
                "normalized_value": f"paris {i}",
                "type": "WikipediaEntity",
                "value": f"Paris {i}",
            },
        }
        for i in range(n)
    ]


def _truthfulqa_rows() -> list[dict]:
    return [
        {
            "type": "Adversarial",
            "category": "Misconceptions",
            "question": f"What happens if you eat watermelon seeds {i}?",
            "best_answer": "The seeds pass through your digestive system",
            "correct_answers": ["Nothing happens", "The seeds pass through your digestive system"],
            "incorrect_answers": ["You grow watermelons in your stomach", "You get sick"],
            "source": "https://wonderopolis.org/wonder/will-a-watermelon-grow-in-your-belly",
        }
        for i in range(3)
    ]


def _coqa_rows() -> list[dict]:
    stories = [
        ("The cat runs to the river. Then the cat jumps.", ["Who runs?", "What did it do then?"], ["the cat", "jumps"]),
        ("A king lives in Paris. He likes music.", ["Where does the king live?", "What does he like?", "Who?"], []),
        ("The dog is red. It sleeps.", ["What color is the dog?"], ["red"]),
    ]
    rows = []
    for story, questions, answers in stories:
        answers = answers or ["in Paris", "music", "the king"]
        rows.append(
            {
                "source": "wikipedia",
                "story": story,
                "questions": questions,
                "answers": {
                    "input_text": answers,
                    "answer_start": [0] * len(answers),
                    "answer_end": [5] * len(answers),
                },
            }
        )
    return rows


def _tydiqa_rows() -> list[dict]:
    return [
        {
            "id": f"{language}-{7432209516838383419 + i}-0",
            "title": "Paris",
            "context": "Paris is the capital of France.",
            "question": f"What is the capital of France {i}?",
            "answers": {"text": ["Paris", "Paris"], "answer_start": [0, 0]},
        }
        for i, language in enumerate(["english", "finnish", "swahili"])
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _qa_rows(n: int) -> list[dict]:
    return _triviaqa_rows(n)


def _datamodule(tiny_model_dir, data_path, **kwargs) -> QADataModule:
    kwargs.setdefault("dataset", "triviaqa")
    dm = QADataModule(data_path=str(data_path), model_name=str(tiny_model_dir), **kwargs)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------------- loaders
def test_triviaqa__jsonl_in_hub_schema_gives_value_as_target_and_aliases_as_answers(tmp_path):
    records = load_qa_records("triviaqa", _write_jsonl(tmp_path / "tqa.jsonl", _triviaqa_rows(4)))
    assert [r.id for r in records] == ["tc_0", "tc_1", "tc_2", "tc_3"]  # rows, not column names
    assert records[2].question == "Which city is capital number 2?"
    assert records[2].answer == "Paris 2"
    assert records[2].answers == ["Paris 2", "City of Light 2"]
    assert records[2].context is None


def test_truthfulqa__parquet_keeps_best_correct_and_incorrect_answers(tmp_path):
    import datasets

    path = tmp_path / "validation-00000-of-00001.parquet"
    datasets.Dataset.from_list(_truthfulqa_rows()).to_parquet(str(path))
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

    rows = _coqa_rows()
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
    records = load_qa_records("tydiqa", _write_jsonl(tmp_path / "tydi.jsonl", _tydiqa_rows()))
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
    rows = _triviaqa_rows(3)
    for row in rows:
        del row["answer"]["value"]
    path = _write_jsonl(tmp_path / "broken.jsonl", rows)
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


# ------------------------------------------------------------------------------------------------ datamodule
def test_max_samples_above_the_data__warns_and_uses_all(tiny_model_dir, tmp_path):
    path = _write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(10))
    with pytest.warns(UserWarning, match="max_samples=50 is more than the 10 questions"):
        dm = _datamodule(tiny_model_dir, path, max_samples=50)
    assert len(dm.train_records) + len(dm.tracking_records) + len(dm.test_records) == 10


def test_split__seeded_disjoint_and_80_10_10(tiny_model_dir, tmp_path):
    path = _write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(40))
    dm = _datamodule(tiny_model_dir, path, seed=3)
    ids = [[r.id for r in part] for part in (dm.train_records, dm.tracking_records, dm.test_records)]
    assert [len(part) for part in ids] == [32, 4, 4]
    assert sorted(i for part in ids for i in part) == sorted(f"tc_{i}" for i in range(40))
    again = _datamodule(tiny_model_dir, path, seed=3)
    assert [r.id for r in again.tracking_records] == ids[1]
    other = _datamodule(tiny_model_dir, path, seed=4)
    assert [r.id for r in other.train_records] != ids[0]
    capped = _datamodule(tiny_model_dir, path, seed=3, max_samples=20)
    assert [len(capped.train_records), len(capped.tracking_records), len(capped.test_records)] == [16, 2, 2]


def test_split__a_coqa_story_never_straddles_two_splits():
    records = [
        QARecord(id=f"{s}-{t}", question="q", answer="a", answers=["a"], group=str(s))
        for s in range(10)
        for t in range(3)
    ]
    parts = split_records(records, (0.8, 0.1, 0.1))
    groups = [{r.group for r in part} for part in parts]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert [len(p) for p in parts] == [24, 3, 3]


def _rows_of(loader) -> list[tuple[list[int], list[int], list[int]]]:
    rows = []
    for batch in loader:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            rows.append((ids.tolist(), mask.tolist(), labels.tolist()))
    return rows


def test_labels__only_the_answer_and_eos_are_trained_on(tiny_model_dir, tmp_path):
    path = _write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(30))
    dm = _datamodule(tiny_model_dir, path, batch_size=4)
    tokenizer = dm.tokenizer
    rows = _rows_of(dm.tracking_dataloader())
    assert len(rows) == len(dm.tracking_records) == 3
    for (ids, mask, labels), record in zip(rows, dm.tracking_records):
        length = sum(mask)
        assert mask == [1] * length + [0] * (len(mask) - length)  # right padding
        assert ids[length:] == [tokenizer.pad_token_id] * (len(ids) - length)
        trained = [i for i, label in enumerate(labels) if label != -100]
        assert trained == list(range(trained[0], length))  # one span, answer through EOS, nothing in padding
        assert [labels[i] for i in trained] == ids[trained[0] : length]
        assert tokenizer.decode(ids[trained[0] : length]).strip() == f"{record.answer}</s>"
        # The sequence is the natural tokenization of the whole text, then EOS; the prompt is everything before.
        assert ids[: length - 1] == tokenizer(f"Question: {record.question}\nAnswer: {record.answer}")["input_ids"]
        assert tokenizer.decode(ids[: trained[0]]).rstrip() == f"Question: {record.question}\nAnswer:"
        assert dm.prompt_ids(record) == ids[: trained[0]]


def test_tracking_set__never_appears_in_the_train_loader(tiny_model_dir, tmp_path):
    path = _write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(50))
    dm = _datamodule(tiny_model_dir, path, batch_size=8)

    def sequences(loader):
        return [tuple(ids[: sum(mask)]) for ids, mask, _ in _rows_of(loader)]

    train, tracking = sequences(dm.train_dataloader()), sequences(dm.tracking_dataloader())
    assert len(train) == 40 and len(tracking) == 5
    assert not set(train) & set(tracking)
    assert sequences(dm.tracking_dataloader()) == tracking  # fixed order


def test_chat_template__masks_all_but_the_assistant_answer(tiny_model_dir, tiny_tokenizer, tmp_path):
    chat_dir = tmp_path / "chat-tokenizer"
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_model_dir)
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.save_pretrained(chat_dir)
    path = _write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(10))
    dm = QADataModule(dataset="triviaqa", data_path=str(path), model_name=str(chat_dir), use_chat_template=True)
    dm.setup("fit")
    (ids, mask, labels), record = _rows_of(dm.val_dataloader())[0], dm.test_records[0]
    trained = [i for i, label in enumerate(labels) if label != -100]
    prompt = f"<s>user: {record.question}</s>\n<s>assistant: "
    assert ids[: trained[0]] == dm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert dm.tokenizer.decode(ids[trained[0] : sum(mask)]).strip() == f"{record.answer}</s>"


def test_coqa__story_is_the_context_and_is_cut_to_fit_max_length(tiny_model_dir, tmp_path):
    rows = _coqa_rows() * 4
    rows[0] = {**rows[0], "story": "The cat runs to the river. " * 60}
    path = _write_jsonl(tmp_path / "coqa.jsonl", rows)
    dm = _datamodule(tiny_model_dir, path, dataset="coqa", max_length=64, split_fractions=(0.5, 0.25, 0.25))
    assert dm.use_context
    for ids, mask, labels in _rows_of(dm.train_dataloader()) + _rows_of(dm.val_dataloader()):
        assert sum(mask) <= 64
        assert dm.tokenizer.decode(ids[: sum(mask)]).startswith("Context: ")
        assert any(label != -100 for label in labels)
    assert len(dm.train_records) + len(dm.tracking_records) + len(dm.test_records) == 4 * 6


def test_eval_split__test_set_comes_from_that_split(tiny_model_dir, tmp_path):
    import datasets

    train, validation = _qa_rows(20), _qa_rows(26)[20:]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "validation": datasets.Dataset.from_list(validation)}
    ).save_to_disk(str(tmp_path / "tqa"))
    dm = _datamodule(tiny_model_dir, tmp_path / "tqa", eval_split="validation", split_fractions=(0.8, 0.2, 0.0))
    assert sorted(r.id for r in dm.test_records) == [f"tc_{i}" for i in range(20, 26)]
    assert [len(dm.train_records), len(dm.tracking_records)] == [16, 4]
    one_file = _write_jsonl(tmp_path / "train.jsonl", train)
    with pytest.raises(ValueError, match="one file"):
        QADataModule(dataset="triviaqa", data_path=str(one_file), eval_split="validation")


def test_every_init_argument_is_documented_for_the_cli():
    doc = QADataModule.__init__.__doc__
    for name in inspect.signature(QADataModule.__init__).parameters:
        if name != "self":
            assert f"    {name}: " in doc, name
    assert next(iter(DATASETS)) == QADataModule.__init__.__defaults__[0] == "fanoutqa"


def test_fanoutqa_default__batches_have_answers(tiny_model_dir):
    dm = QADataModule(model_name=str(tiny_model_dir), max_samples=100, batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16
    assert ((batch["labels"] != -100).sum(dim=1) >= 2).all()  # at least one answer token and EOS
    assert torch.equal(batch["labels"] != -100, (batch["labels"] != -100) & (batch["attention_mask"] == 1))


def test_epoch_shuffle__order_depends_only_on_seed_and_epoch():
    from datamodules.qa import EpochShuffle

    first, again = EpochShuffle(50, seed=3), EpochShuffle(50, seed=3)
    orders = []
    for epoch in range(3):
        first.set_epoch(epoch)
        orders.append(list(first))
    again.set_epoch(2)  # a resumed run jumps straight to epoch 2
    assert list(again) == orders[2]
    assert sorted(orders[0]) == list(range(50))
    assert orders[0] != orders[1] != orders[2]
    assert list(EpochShuffle(50, seed=4)) != orders[0]
