"""Activation caches for tests: a real harvest of the tiny Llama (``harvest_tiny``), and a synthetic cache whose row
``i`` holds ``i`` in every feature (``write_index_cache``), written in the format of
``neurolight.datamodules.sae.activation_cache`` without an LLM, to follow rows through the cached stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurolight.datamodules.sae.activation_cache import (
    FORMAT,
    SHARD_NAME,
    TOKENS_DIR,
    save_array,
    write_manifest,
)
from neurolight.datamodules.sae.harvest import harvest_activations

TINY_SITES = ["layers.1.mlp_activations", "layers.0.attn_sublayer"]
"""Two sites of the tiny Llama read from one forward: 128 and 64 wide."""


def harvest_tiny(output: Path, corpus: Path, model_dir: Path, **overrides) -> Path:
    """The tiny corpus's contexts (16 tokens, position 0 left out: 15 rows each) in shards of 40 contexts."""
    args = dict(dataset_path=str(corpus), model_name=str(model_dir), sites=TINY_SITES, contexts_per_shard=40)
    return harvest_activations(str(output), **{**args, **overrides})


def files(directory: Path) -> dict[str, bytes]:
    """The contents of every file of a cache directory but hidden ones (the folder lock, temporary files)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def write_index_cache(path: Path, num_contexts: int, rows_per_context: int, d_in: int = 4, per_shard: int = 7) -> Path:
    """A one-site cache (``layers.0.mlp_sublayer``) of float32 rows ``[i, i, ...]`` for row ``i``."""
    site = "layers.0.mlp_sublayer"
    shards, norm_sum = [], 0.0
    for index in range(-(-num_contexts // per_shard)):
        contexts = np.arange(index * per_shard, min((index + 1) * per_shard, num_contexts))
        rows = np.arange(contexts[0] * rows_per_context, (contexts[-1] + 1) * rows_per_context, dtype=np.float32)
        array = np.repeat(rows[:, None], d_in, axis=1)
        tokens = np.tile(contexts[:, None], (1, rows_per_context + 1)).astype(np.int32)
        crc = {TOKENS_DIR: save_array(path / TOKENS_DIR / SHARD_NAME.format(index), tokens)}
        crc[site] = save_array(path / site / SHARD_NAME.format(index), array)
        norms = np.linalg.norm(array.astype(np.float64), axis=1)
        shards.append({"index": index, "crc32": crc, "norm_sum": {site: norms.sum()},
                       "squared_norm_sum": {site: (norms**2).sum()}})  # fmt: skip
        norm_sum += norms.sum()
    num_rows = num_contexts * rows_per_context
    manifest = {
        "format": FORMAT, "dataset_path": "/nowhere", "model_name": "tiny", "model": "tiny", "sites": {
            site: {"layer_type": "mlp_sublayer", "layer_id": 0, "hook_point": "model.layers.0.mlp", "d_in": d_in,
                   "mean_norm": norm_sum / num_rows}},
        "num_contexts": num_contexts, "num_tokens": rows_per_context + 1, "contexts_per_shard": per_shard,
        "dtype": "float32", "llm_dtype": "float32", "exclude_first_position": True, "hook_points": {},
        "hook_templates": {"mlp_sublayer": "model.layers.{}.mlp"}, "corpus": {"path": "/nowhere"},
        "first_position": 1, "rows_per_context": rows_per_context, "num_rows": num_rows,
        "num_shards": len(shards), "batch_size": 1, "shards": shards, "complete": True,
    }  # fmt: skip
    write_manifest(path, manifest)
    return path
