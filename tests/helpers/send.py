"""Builders for SEND fine-tuning runs on the tiny Llama (shared by the sensitivity and training tests): the
QADataModule over TriviaQA-schema records, the SendModule and a CPU fit."""

from __future__ import annotations

import json

import lightning.pytorch as pl

from neurolight.datamodules.send.qa import QADataModule
from neurolight.lightning_modules import SendModule

D_MODEL = 64


def write_records(path, n: int = 48):
    """``n`` questions in TriviaQA's schema, one JSON object a line, with one-word answers."""
    words = "red green blue river mountain city king queen music cat dog".split()
    rows = []
    for i in range(n):
        # Questions of different lengths, so that every batch is right padded.
        question = " ".join(words[(i + j) % len(words)] for j in range(2 + i % 7))
        rows.append(
            {"question": f"Which {question}?", "question_id": f"q{i}", "answer": {"value": words[i % 5], "aliases": []}}
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_datamodule(model_dir, records_path) -> QADataModule:
    return QADataModule(
        dataset="triviaqa",
        data_path=str(records_path),
        model_name=str(model_dir),
        batch_size=8,
        max_length=64,
        split_fractions=(0.5, 0.25, 0.25),
    )


def make_module(model_dir, tmp_path, **kwargs) -> SendModule:
    kwargs.setdefault("save_model", False)
    kwargs.setdefault("output_dir", str(tmp_path / "out"))
    kwargs.setdefault("learning_rate", 1e-2)
    kwargs.setdefault("weight_decay", 0.1)
    return SendModule(model_name=str(model_dir), **kwargs)


def fit(
    module,
    datamodule,
    tmp_path,
    callbacks,
    max_epochs: int,
    ckpt_path=None,
    checkpoint=None,
    logger=False,
    devices: int = 1,
    **kwargs,
):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        max_epochs=max_epochs,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint is not None,
        callbacks=[*callbacks, *([checkpoint] if checkpoint else [])],
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer
