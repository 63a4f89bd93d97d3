"""Builders for end-to-end SAE runs on the tiny model (shared by the training and strategy tests)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from neurolight.callbacks import DeadLatentResampler, SaeCheckpoint
from neurolight.datamodules import ActivationDataModule
from neurolight.datamodules.sae.tokenized_corpus import build_tokenized_corpus
from neurolight.lightning_modules import ReLU, SparseAutoencoderModule, TopK
from tests.conftest import make_sentences


def build_tiny_corpus(directory: Path, tokenizer_dir: Path, contexts: int = 192, context_length: int = 16) -> Path:
    docs = directory / "docs.jsonl"
    with docs.open("w") as f:
        for i, text in enumerate(make_sentences(300, seed=5, min_words=30, max_words=60)):
            f.write(json.dumps({"text": f"{text} {make_sentences(1, seed=1000 + i)[0]}"}) + "\n")
    return build_tokenized_corpus(
        directory / "corpus",
        tokenizer=str(tokenizer_dir),
        data_files=[str(docs)],
        min_tokens=context_length,
        context_length=context_length,
        num_files=2,
        num_samples_per_file=contexts // 2,
        overwrite=True,
    )


def make_datamodule(corpus: Path, model_dir: Path, **overrides) -> ActivationDataModule:
    args = dict(
        dataset_path=str(corpus),
        model_name=str(model_dir),
        layer_id=1,
        layer_type="mlp_activations",
        num_tokens=16,
        batch_size_llm=8,
        batch_size_autoencoder=64,
        num_batches_preload=6,
        val_contexts=16,
        val_batch_size=8,
    )
    return ActivationDataModule(**{**args, **overrides})


def make_module(**overrides) -> SparseAutoencoderModule:
    # These tests check learning and resampling mechanics, not sparsity: a weak L1 and no warning about a dense SAE.
    args = dict(
        act_vec_size=128,
        dict_vec_size=256,
        architecture=ReLU(l1_coefficient=1e-3),
        learning_rate=3e-3,
        max_l0_fraction=None,
    )
    return SparseAutoencoderModule(**{**args, **overrides})


def make_trainer(root: Path, max_steps: int, ckpt_every: int = 1000, resample_every: int | None = None, **kw):
    callbacks = [SaeCheckpoint(batches_between_ckpt=ckpt_every, dirpath=str(root / "checkpoints"))]
    if resample_every:
        callbacks.append(DeadLatentResampler(method="anthropic", neuron_resampling_interval=resample_every))
    args = dict(
        default_root_dir=str(root),
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(str(root), name="logs"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=5,
    )
    return pl.Trainer(**{**args, **kw})


def build_sampler_sae(root: Path, model_dir: Path) -> tuple[Path, Path, Path]:
    """A tiny TopK SAE (128 -> 256, k=8) on layer 1's mlp_activations of the tiny Llama, trained a few steps, and its
    corpus of 128 contexts of 16 tokens: ``(root, corpus, checkpoint)``, for the latent sampler's tests."""
    corpus = build_tiny_corpus(root, model_dir, contexts=128, context_length=16)
    torch.manual_seed(0)
    module = make_module(act_vec_size=128, dict_vec_size=256, architecture=TopK(k=8))
    make_trainer(root / "sae", max_steps=4, ckpt_every=100).fit(module, make_datamodule(corpus, model_dir))
    return root, corpus, root / "sae" / "checkpoints" / "last.ckpt"
