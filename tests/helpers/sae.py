"""Builders for end-to-end SAE runs on the tiny model (shared by the training and strategy tests), and synthetic
sparse data with a plain training loop for the SparseAutoencoder alone."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.nn import functional as F

from neurolight.callbacks import DeadLatentResampler, SaeCheckpoint
from neurolight.datamodules import ActivationDataModule
from neurolight.datamodules.sae.tokenized_corpus import build_tokenized_corpus
from neurolight.lightning_modules import ReLU, SparseAutoencoder, SparseAutoencoderModule, TopK
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


def synthetic_sparse_data(
    n: int,
    d_in: int = 32,
    n_features: int = 48,
    active: int = 3,
    seed: int = 0,
    magnitudes: tuple[float, float] = (1.0, 2.0),
) -> torch.Tensor:
    """x = sparse non-negative codes @ a fixed random unit-norm dictionary: ``active`` features per sample, each with
    a magnitude drawn uniformly from ``magnitudes``."""
    dictionary = F.normalize(torch.randn(n_features, d_in, generator=torch.Generator().manual_seed(1234)), dim=1)
    generator = torch.Generator().manual_seed(seed)
    support = torch.rand(n, n_features, generator=generator).argsort(dim=1)[:, :active]
    low, high = magnitudes
    values = low + (high - low) * torch.rand(n, active, generator=generator)
    return torch.zeros(n, n_features).scatter(1, support, values) @ dictionary


def train_sae(
    sae: SparseAutoencoder, data: torch.Tensor, steps: int, lr: float, batch: int = 256, dead_after: int | None = None
) -> SparseAutoencoder:
    """Train ``sae`` on ``data`` in order, as SparseAutoencoderModule does but without Lightning: Adam, the decoder
    constraint around each step, and (``dead_after``) the auxiliary loss on latents silent for that many tokens."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    tokens_since_fired = torch.zeros(sae.d_sae)
    for step in range(steps):
        dead = None if dead_after is None else tokens_since_fired > dead_after
        out = sae(data[(step * batch) % len(data) :][:batch], dead_mask=dead)
        optimizer.zero_grad()
        out.loss.backward()
        if sae.normalize_decoder:
            sae.remove_parallel_decoder_grad_()
        optimizer.step()
        if sae.normalize_decoder:
            sae.normalize_decoder_()
        tokens_since_fired = torch.where((out.latents > 0).any(0), 0, tokens_since_fired + batch)
    return sae
