"""The QADataModule: seeded splits, prompts and labels, loaders and the chat template, on small local copies in
the data sets' real Hugging Face schema."""

from __future__ import annotations

import inspect

import pytest
import torch

from neurolight.datamodules.send.qa import QADataModule, split_records
from neurolight.datamodules.send.qa_records import DATASETS, QARecord
from tests.helpers.qa import coqa_rows, triviaqa_rows, write_jsonl

_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _qa_rows(n: int) -> list[dict]:
    return triviaqa_rows(n)


def _datamodule(tiny_model_dir, data_path, **kwargs) -> QADataModule:
    kwargs.setdefault("dataset", "triviaqa")
    dm = QADataModule(data_path=str(data_path), model_name=str(tiny_model_dir), **kwargs)
    dm.setup("fit")
    return dm


def test_max_samples_above_the_data__warns_and_uses_all(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(10))
    with pytest.warns(UserWarning, match="max_samples=50 is more than the 10 questions"):
        dm = _datamodule(tiny_model_dir, path, max_samples=50)
    assert len(dm.train_records) + len(dm.tracking_records) + len(dm.test_records) == 10


def test_split__seeded_disjoint_and_80_10_10(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(40))
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
    path = write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(30))
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
    path = write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(50))
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
    path = write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(10))
    dm = QADataModule(dataset="triviaqa", data_path=str(path), model_name=str(chat_dir), use_chat_template=True)
    dm.setup("fit")
    (ids, mask, labels), record = _rows_of(dm.val_dataloader())[0], dm.test_records[0]
    trained = [i for i, label in enumerate(labels) if label != -100]
    prompt = f"<s>user: {record.question}</s>\n<s>assistant: "
    assert ids[: trained[0]] == dm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert dm.tokenizer.decode(ids[trained[0] : sum(mask)]).strip() == f"{record.answer}</s>"


def test_chat_template__used_by_default_where_the_tokenizer_has_one_and_off_on_request(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    chat_dir = tmp_path / "chat-tokenizer"
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_model_dir)
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.save_pretrained(chat_dir)
    path = write_jsonl(tmp_path / "tqa.jsonl", _qa_rows(10))
    prompts = {}
    for model, setting in ((chat_dir, None), (chat_dir, False), (tiny_model_dir, None)):
        dm = QADataModule(dataset="triviaqa", data_path=str(path), model_name=str(model), use_chat_template=setting)
        dm.setup("predict")
        prompts[(model, setting)] = (dm.chat_template_used, dm.tokenizer.decode(dm.prompt_ids(dm.test_records[0])))
    assert prompts[(chat_dir, None)][0] and prompts[(chat_dir, None)][1].startswith("<s>user: ")
    assert prompts[(chat_dir, False)] == (False, prompts[(chat_dir, False)][1])
    assert prompts[(chat_dir, False)][1].startswith("Question: ")  # the plain prompt_template, as the scripts did
    assert prompts[(tiny_model_dir, None)][0] is False  # no template: the plain prompt, no error
    with pytest.raises(ValueError, match="has no chat template"):
        QADataModule(
            dataset="triviaqa", data_path=str(path), model_name=str(tiny_model_dir), use_chat_template=True
        ).setup("fit")


def test_coqa__story_is_the_context_and_is_cut_to_fit_max_length(tiny_model_dir, tmp_path):
    rows = coqa_rows() * 4
    rows[0] = {**rows[0], "story": "The cat runs to the river. " * 60}
    path = write_jsonl(tmp_path / "coqa.jsonl", rows)
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
    one_file = write_jsonl(tmp_path / "train.jsonl", train)
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
    from neurolight.datamodules.send.qa import EpochShuffle

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
