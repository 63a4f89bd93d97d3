"""The demo recipes (configs/) shrunk onto the tiny Llama of tests/conftest.py, as dicts for ``write_recipe``: the
kill -9 and full-disk tests run them through the ``neurolight`` command. Each lists ``tests.helpers.kill9``'s
``StopBeforeBatch``, which does nothing outside a process started to be killed."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.kill9 import STOPPER

SEND_EPOCHS, SEND_BATCHES = 4, 3  # 24 training questions of tests.helpers.send.write_records in batches of 8
SAE_STEPS, SAE_EVERY = 16, 4  # a step checkpoint every 4 steps
SAMPLER_FREQUENCY_CONTEXTS, SAMPLER_NUM_SAMPLES, SAMPLER_BATCH = 48, 80, 8  # 6 + 10 batches


def send_recipe(root: Path, model_dir: Path, records: Path, checkpoints: Path | None = None) -> dict:
    """configs/send/demo.yaml: last.ckpt every epoch, sensitive neurons identified every epoch and dropped in the
    last two; the run folder is ``root/tiny/version_0`` (``checkpoints``: another checkpoint folder)."""
    checkpoint = {"class_path": "neurolight.callbacks.ResumableCheckpoint"}
    if checkpoints is not None:
        checkpoint["init_args"] = {"dirpath": str(checkpoints)}
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": SEND_EPOCHS, "num_sanity_val_steps": 0,
            "log_every_n_steps": 1, "default_root_dir": str(root), "enable_model_summary": False,
            "logger": {"class_path": "neurolight.callbacks.ResumableCSVLogger",
                       "init_args": {"save_dir": str(root), "name": "tiny", "version": 0}},
            "callbacks": [
                checkpoint,
                {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"},
                STOPPER,
                {"class_path": "neurolight.callbacks.SensitiveNeuronDropout",
                 "init_args": {"sensitivity_threshold": 0.25, "identify_every_n_epochs": 1, "drop_epochs": 2,
                               "log_eigenscore": False}},
            ],
        },
        "model": {"class_path": "neurolight.lightning_modules.SendModule",
                  "init_args": {"model_name": str(model_dir), "learning_rate": 0.01, "weight_decay": 0.1,
                                "output_dir": str(root / "model"), "run_name": "send"}},
        "data": {"class_path": "neurolight.datamodules.QADataModule",
                 "init_args": {"dataset": "triviaqa", "data_path": str(records), "model_name": str(model_dir),
                               "batch_size": 8, "max_length": 64, "split_fractions": [0.5, 0.25, 0.25]}},
    }  # fmt: skip


def sae_recipe(root: Path, corpus: Path, model_dir: Path) -> dict:
    """configs/sae/demo.yaml: a TopK SAE on layer 1's MLP activations, anthropic resampling every 6 steps (so on
    the step-12 checkpoint, as the demo resamples on its step-80 one); the run folder is ``root/tiny/version_0``."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": SAE_STEPS, "max_epochs": -1, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "log_every_n_steps": 1, "default_root_dir": str(root),
            "enable_checkpointing": False, "enable_model_summary": False,
            "logger": {"class_path": "neurolight.callbacks.ResumableCSVLogger",
                       "init_args": {"save_dir": str(root), "name": "tiny", "version": 0}},
            "callbacks": [
                {"class_path": "neurolight.callbacks.SaeCheckpoint",
                 "init_args": {"batches_between_ckpt": SAE_EVERY}},
                {"class_path": "neurolight.callbacks.DeadLatentResampler",
                 "init_args": {"method": "anthropic", "neuron_resampling_interval": 6, "num_resampling_inputs": 256}},
                {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"},
                STOPPER,
            ],
        },
        "model": {"class_path": "neurolight.lightning_modules.SparseAutoencoderModule",
                  "init_args": {"act_vec_size": 128, "dict_vec_size": 256,
                                "architecture": {"class_path": "neurolight.lightning_modules.TopK",
                                                 "init_args": {"k": 8}},
                                "learning_rate": 0.003, "lr_warmup_steps": 2, "dead_tokens_threshold": 256,
                                "metrics_every_n_steps": 2}},
        "data": {"class_path": "neurolight.datamodules.ActivationDataModule",
                 "init_args": {"dataset_path": str(corpus), "model_name": str(model_dir), "layer_id": 1,
                               "layer_type": "mlp_activations", "num_tokens": 16, "batch_size_llm": 8,
                               "batch_size_autoencoder": 64, "num_batches_preload": 6, "val_contexts": 16,
                               "val_batch_size": 8}},
    }  # fmt: skip


def sample_recipe(save_path: Path, checkpoint: Path, corpus: Path, snapshot_every_n_contexts: int | None = 16) -> dict:
    """configs/interpret/sample.yaml on the SAE of ``tests.helpers.sae.build_sampler_sae``: 6 batches of the
    frequency pass, 10 of the sampling pass, a snapshot every 2 batches."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "logger": False, "default_root_dir": str(save_path.parent),
            "callbacks": [
                STOPPER,
                {"class_path": "neurolight.callbacks.InterpretationSamplesWriter",
                 "init_args": {"save_path": str(save_path), "overwrite": True,
                               "snapshot_every_n_contexts": snapshot_every_n_contexts}},
            ],
        },
        "model": {"class_path": "neurolight.lightning_modules.LatentSampler",
                  "init_args": {"sae_checkpoint": str(checkpoint), "log_freq_lower": -2.0, "log_freq_upper": -1.3,
                                "num_top": 4, "num_quantiles": 4, "num_per_quantile": 2, "num_random": 3,
                                "num_negative": 3, "seed": 7}},
        "data": {"class_path": "neurolight.datamodules.CorpusContextDataModule",
                 "init_args": {"dataset_path": str(corpus), "frequency_tokens": SAMPLER_FREQUENCY_CONTEXTS * 16,
                               "num_samples": SAMPLER_NUM_SAMPLES, "batch_size": SAMPLER_BATCH, "seed": 0}},
    }  # fmt: skip


def interpret_recipe(root: Path, samples: Path, store: dict, index: str, max_latents: int) -> dict:
    """configs/interpret/demo.yaml, the tiny Llama (the model the samples were taken from) explaining: the three
    scorers, one latent a batch, into ``store`` (a class_path dict) under ``index``; fallback files go to ``root``."""
    explainer = json.loads((samples / "metadata.json").read_text())["model_name"]
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "logger": False, "default_root_dir": str(root),
            "callbacks": [
                STOPPER,
                {"class_path": "neurolight.callbacks.InterpretationWriter",
                 "init_args": {"store": store, "index_name": index}},
            ],
        },
        "model": {"class_path": "neurolight.lightning_modules.LatentInterpreter",
                  "init_args": {"explainer_model": explainer, "max_explanation_tokens": 6,
                                "scorers": ["simulation", "detection", "fuzzing"], "forward_batch_size": 8}},
        "data": {"class_path": "neurolight.datamodules.InterpretationDataModule",
                 "init_args": {"samples_path": str(samples), "num_interpretation_samples": 2,
                               "num_simulation_samples": 2, "num_detection_samples": 2, "num_fuzzing_samples": 2,
                               "max_latents": max_latents, "batch_size": 1, "seed": 0}},
    }  # fmt: skip


def sqlite_store(path: Path) -> dict:
    return {"class_path": "neurolight.callbacks.SQLiteStore", "init_args": {"path": str(path)}}


def elasticsearch_store(address: str) -> dict:
    return {"class_path": "neurolight.callbacks.ElasticsearchStore",
            "init_args": {"server_address": address, "api_key_env": None}}  # fmt: skip
