"""QADataModule: QA records -> prompts with answers -> token ids with loss only on the answer.

neurolight fit --model ... --data neurolight.datamodules.send.qa.QADataModule --data.dataset triviaqa --data.data_path
tqa.parquet

Records (``neurolight.datamodules.send.qa_records``) are shuffled with the seed, cut to ``max_samples`` and split into
train /
tracking / test. The tracking set is never trained on: SEND embeds it after every epoch to find sensitive
neurons. Every batch is a dict of ``input_ids``, ``attention_mask`` and ``labels``, all (batch, seq) int64, right
padded; ``labels`` is -100 everywhere except the answer tokens and the EOS after them.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from neurolight.datamodules.llm.padding import pad_labels, pad_left, pad_right
from neurolight.datamodules.send.qa_records import QARecord, dataset_spec, download_qa_split, load_qa_records

DEFAULT_PROMPT = "Question: {question}\nAnswer: {answer}"
CONTEXT_PREFIX = "Context: {context}\n"
"""Put before ``prompt_template`` when the context is used and the template has no ``{context}`` of its own."""


class EpochShuffle(Sampler[int]):
    """A permutation that depends only on (seed, epoch). Lightning calls ``set_epoch`` before every epoch, so a run
    resumed at epoch e trains on the batches an uninterrupted run sees at e; a generator seeded once per
    DataLoader would instead restart at epoch 0's order after every resume."""

    def __init__(self, num_examples: int, seed: int) -> None:
        self.num_examples, self.seed, self.epoch = num_examples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_examples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_examples


def split_records(
    records: list[QARecord], fractions: tuple[float, float, float]
) -> tuple[list[QARecord], list[QARecord], list[QARecord]]:
    """Cut (already shuffled) records into train / tracking / test at the fractions' boundaries.

    A group (one CoQA story) goes whole to the split where its first record falls, so with one record per group
    the sizes are exactly ``round(n * f_train)``, ``round(n * (f_train + f_tracking)) - round(n * f_train)``, rest.
    """
    n = len(records)
    bounds = (round(n * fractions[0]), round(n * (fractions[0] + fractions[1])))
    parts: tuple[list[QARecord], ...] = ([], [], [])
    split_of_group: dict[str, int] = {}
    for i, record in enumerate(records):
        part = split_of_group.setdefault(record.group, 0 if i < bounds[0] else 1 if i < bounds[1] else 2)
        parts[part].append(record)
    return parts  # type: ignore[return-value]


def shuffle_records(records: list[QARecord], seed: int) -> list[QARecord]:
    """Seeded shuffle of whole groups; a group's records keep their order (CoQA turns)."""
    groups: dict[str, list[QARecord]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    order = list(groups)
    random.Random(seed).shuffle(order)
    return [record for group in order for record in groups[group]]


class _Examples(Dataset):
    def __init__(self, examples: list[tuple[list[int], list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.examples[index]


class _PadRight:
    """Collate (input_ids, labels) lists into right-padded tensors (a class, so worker processes can pickle it)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_right([ids for ids, _ in batch], self.pad_id)
        labels = pad_labels([target for _, target in batch], input_ids.shape[1])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class _PadLeftPrompts:
    """Collate (index, prompt ids, record) triples into left-padded prompts for generation."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[tuple[int, list[int], QARecord]]) -> dict:
        input_ids, attention_mask = pad_left([ids for _, ids, _ in batch], self.pad_id)
        index = torch.tensor([i for i, _, _ in batch])
        records = [record for _, _, record in batch]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "index": index, "records": records}


class QADataModule(pl.LightningDataModule):
    def __init__(
        self,
        dataset: str = "fanoutqa",
        data_path: str | None = None,
        model_name: str = "smollm2-135m",
        max_samples: int | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        use_chat_template: bool | None = None,
        prompt_template: str = DEFAULT_PROMPT,
        use_context: bool | None = None,
        eval_split: str | None = None,
        num_workers: int = 0,
        num_samples: int | None = None,
    ) -> None:
        """
        Args:
            dataset: ``fanoutqa`` (embedded offline default: FanOutQA dev decompositions, ~1.8k factoid
                questions from the PyPI package), ``triviaqa``, ``truthfulqa``, ``coqa`` or ``tydiqa``.
            data_path: Local copy in the Hugging Face schema: a .jsonl/.json/.parquet file (taken as the training
                split), a ``save_to_disk`` directory, or a directory of split-named files. Default: the hub or its
                cache (fanoutqa: the package's JSON).
            model_name: Model whose tokenizer encodes the prompts: a short name (``neurolight.datamodules.MODELS``), a
                Hugging Face id or a local directory. Use the model being fine-tuned.
            max_samples: Use at most this many questions (after a seeded shuffle); default: all. More than the data
                holds warns and uses all.
            max_length: Longest sequence in tokens (prompt + answer + EOS). A too-long context is cut from its
                end; a record that does not fit even so is dropped with a warning.
            batch_size: Sequences per batch, for every loader.
            split_fractions: Train / tracking / test fractions of the questions. The tracking set is never trained
                on (SEND embeds it to find sensitive neurons); the test set gives the validation loss.
            seed: Seed of the shuffle before ``max_samples`` and the split, and of the train loader's order.
            use_chat_template: Format each question as a user turn and the answer as the assistant turn with the
                tokenizer's chat template (``prompt_template`` is then unused). None (default): wherever the tokenizer
                has one, as an Instruct model expects (prompted without it, SmolLM2-Instruct answers with empty
                lines); True: require it; False: always ``prompt_template``. ``chat_template_used`` says which ran.
            prompt_template: Prompt when ``use_chat_template`` is false; must contain ``{question}`` and end with
                ``{answer}``; may contain ``{context}``.
            use_context: Put the passage (CoQA story, TyDiQA paragraph) before the question. Default: only for
                CoQA, whose turns ("What did he do next?") are meaningless without the story.
            eval_split: Take the test set from this split of the data set (e.g. ``validation``) instead of
                carving ``split_fractions[2]`` out of the training split, which is then divided train / tracking
                in the ratio of the first two fractions. The test set is shuffled and cut to ``max_samples``.
            num_workers: DataLoader worker processes.
            num_samples: Questions ``predict`` generates answers for: the first ``num_samples`` of the test set;
                default: all of it.
        """
        super().__init__()
        spec = dataset_spec(dataset)
        if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions={split_fractions} must be three non-negative fractions summing to 1")
        if split_fractions[0] == 0:
            raise ValueError(f"split_fractions={split_fractions} leaves nothing to train on")
        if use_chat_template is not True and (
            "{question}" not in prompt_template or not prompt_template.endswith("{answer}")
        ):
            raise ValueError(
                f"prompt_template {prompt_template!r} must contain '{{question}}' and end with '{{answer}}' "
                "(the answer is followed by EOS)"
            )
        if eval_split is not None:
            if eval_split == spec.train_split:
                raise ValueError(f"eval_split '{eval_split}' is the split {dataset} trains on; leave it unset")
            if data_path is not None and Path(data_path).expanduser().is_file():
                raise ValueError(
                    f"data_path {data_path} is one file, i.e. one split; eval_split '{eval_split}' needs a "
                    "save_to_disk directory or a directory of split-named files"
                )
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples={max_samples} must be positive (or None for all)")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be positive (or None for the whole test set)")
        self.save_hyperparameters()
        self.use_context = spec.needs_context if use_context is None else use_context
        self.tokenizer = None
        self.chat_template_used: bool | None = None
        """Whether the prompts are in the tokenizer's chat template (set in ``setup``)."""
        self._records: dict[str, list[QARecord]] = {}
        self._examples: dict[str, _Examples] = {}

    # ----------------------------------------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        # Downloads into the Hugging Face cache on one process; assigns nothing (Lightning's rule).
        hp = self.hparams
        if hp.data_path is None:
            for split in (None, hp.eval_split) if hp.eval_split else (None,):
                download_qa_split(hp.dataset, split)

    def setup(self, stage: str | None = None) -> None:
        if self._examples:
            return
        from neurolight.datamodules.llm.models import load_tokenizer

        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.model_name)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not self.tokenizer.is_fast:
            raise ValueError(
                f"the tokenizer of '{hp.model_name}' is a slow (Python) one; QADataModule needs a fast tokenizer, "
                "whose character offsets locate the answer tokens"
            )
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if hp.use_chat_template and not has_template:
            raise ValueError(
                f"the tokenizer of '{hp.model_name}' has no chat template; set use_chat_template: false (or leave it "
                "unset: the template is then used wherever one exists)"
            )
        self.chat_template_used = has_template if hp.use_chat_template is None else hp.use_chat_template
        records = self._sample(load_qa_records(hp.dataset, hp.data_path), "questions")
        fractions = tuple(hp.split_fractions)
        if hp.eval_split is None:
            parts = dict(zip(("train", "tracking", "test"), split_records(records, fractions)))
        else:
            pool = fractions[0] + fractions[1]
            train, tracking, _ = split_records(records, (fractions[0] / pool, fractions[1] / pool, 0.0))
            test = load_qa_records(hp.dataset, hp.data_path, split=hp.eval_split)
            test = self._sample(test, f"'{hp.eval_split}' questions")
            parts = {"train": train, "tracking": tracking, "test": test}
        wanted = {"train": fractions[0], "tracking": fractions[1], "test": 1.0 if hp.eval_split else fractions[2]}
        for name, part in parts.items():
            kept, examples = self._encode_all(part, name)
            if not kept and wanted[name] > 0:
                raise ValueError(
                    f"the {name} split of {hp.dataset} is empty ({len(records)} records, split_fractions="
                    f"{fractions}); raise max_samples or the fraction"
                )
            self._records[name], self._examples[name] = kept, _Examples(examples)

    def _sample(self, records: list[QARecord], what: str) -> list[QARecord]:
        hp = self.hparams
        records = shuffle_records(records, hp.seed)
        if hp.max_samples is not None and hp.max_samples > len(records):
            rank_zero_warn(
                f"max_samples={hp.max_samples} is more than the {len(records)} {what} of {hp.dataset}; using all"
            )
        return records[: hp.max_samples]

    # ---------------------------------------------------------------------------------------------- encoding
    def _prefix(self, record: QARecord, context: str | None) -> str:
        """The text before the answer."""
        if self.chat_template_used:
            content = f"Context: {context}\n\nQuestion: {record.question}" if context else record.question
            messages = [{"role": "user", "content": content}]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        template = self.hparams.prompt_template.removesuffix("{answer}")
        if context is not None and "{context}" not in template:
            template = CONTEXT_PREFIX + template
        return template.format(question=record.question, context=context or "")

    def _encode(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels of (prefix, answer) texts: a label on every token overlapping the answer, + EOS.

        The full text is tokenized at once and the answer found by character offsets, so merges across the
        prefix/answer boundary (" Paris" after "Answer:") tokenize exactly as the model will see them.
        """
        tokenizer = self.tokenizer
        # Chat templates write their own BOS; a plain prompt gets the tokenizer's usual special tokens.
        encoded = tokenizer(
            [prefix + answer for prefix, answer in pairs],
            add_special_tokens=not self.chat_template_used,
            return_offsets_mapping=True,
        )
        out = []
        for ids, offsets, (prefix, answer) in zip(encoded["input_ids"], encoded["offset_mapping"], pairs):
            ids, offsets = list(ids), [tuple(o) for o in offsets]
            while len(ids) > 1 and offsets[-1] == (0, 0):  # an EOS the tokenizer appends itself
                ids.pop(), offsets.pop()
            start, end = len(prefix), len(prefix) + len(answer)
            labels = [t if e > s and e > start and s < end else -100 for t, (s, e) in zip(ids, offsets)]
            out.append(([*ids, tokenizer.eos_token_id], [*labels, tokenizer.eos_token_id]))
        return out

    def _encode_record(self, record: QARecord) -> tuple[list[int], list[int]] | None:
        """Encode one record within max_length, cutting the end of its context if needed; None if it cannot fit."""
        context = record.context if self.use_context else None
        for _ in range(4):
            ids, labels = self._encode([(self._prefix(record, context), record.answer)])[0]
            excess = len(ids) - self.hparams.max_length
            if excess <= 0:
                return ids, labels
            if not context:
                return None
            cut = self.tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            keep = len(cut) - excess - 1  # one spare token: the shorter text may tokenize differently at its end
            context = context[: cut[keep - 1][1]] if keep > 0 else ""
        return None

    def _encode_all(self, records: list[QARecord], name: str) -> tuple[list[QARecord], list]:
        contexts = [record.context if self.use_context else None for record in records]
        pairs = [(self._prefix(r, c), r.answer) for r, c in zip(records, contexts)]
        kept, examples = [], []
        for record, example in zip(records, self._encode(pairs) if pairs else []):
            if len(example[0]) > self.hparams.max_length:
                example = self._encode_record(record)
            if example is not None:
                kept.append(record)
                examples.append(example)
        if len(kept) < len(records):
            rank_zero_warn(
                f"{len(records) - len(kept)} of {len(records)} {name} questions of {self.hparams.dataset} do not "
                f"fit in max_length={self.hparams.max_length} tokens and were dropped; raise max_length"
            )
        return kept, examples

    def prompt_ids(self, record: QARecord) -> list[int]:
        """Token ids up to the first answer token, exactly as in training: the prompt to generate from."""
        example = self._encode_record(record)
        if example is None:
            raise ValueError(f"record {record.id} does not fit in max_length={self.hparams.max_length}")
        ids, labels = example
        first = next(i for i, label in enumerate(labels) if label != -100)
        return ids[:first]

    # -------------------------------------------------------------------------------------------- loaders
    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if not self._examples:
            raise RuntimeError("QADataModule: call setup() before asking for a dataloader")
        examples = self._examples[name]
        return DataLoader(
            examples,
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffle(len(examples), self.hparams.seed) if shuffle else None,
            collate_fn=_PadRight(self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def tracking_dataloader(self) -> DataLoader:
        """The tracking set in fixed order (row i of the concatenated batches is ``tracking_records[i]``)."""
        return self._loader("tracking", shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """The test split, for the validation loss."""
        return self._loader("test", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Generation prompts for the first ``num_samples`` test records: ``input_ids`` and ``attention_mask``
        (batch, seq) LEFT padded (generation continues every row at the right edge), ``index`` (batch,) each
        record's position in ``test_records``, and ``records``, the QARecords themselves."""
        records = self.test_records[: self.hparams.num_samples]
        prompts = [(i, self.prompt_ids(record), record) for i, record in enumerate(records)]
        return DataLoader(
            prompts,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            collate_fn=_PadLeftPrompts(self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def _split_records(self, name: str) -> list[QARecord]:
        if not self._records:
            raise RuntimeError("QADataModule: call setup() before asking for records")
        return self._records[name]

    @property
    def train_records(self) -> list[QARecord]:
        return self._split_records("train")

    @property
    def tracking_records(self) -> list[QARecord]:
        """Raw tracking records, in the order of ``tracking_dataloader``."""
        return self._split_records("tracking")

    @property
    def test_records(self) -> list[QARecord]:
        """Raw test records (gold ``answers`` for generation metrics), in the order of ``val_dataloader``."""
        return self._split_records("test")
