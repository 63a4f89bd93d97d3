"""sparsify's SAE directory: ``cfg.json`` + ``sae.safetensors``, as ``SparseCoder.save_to_disk`` writes it and
``SparseCoder.load_from_disk`` reads it (docs/sae.md, Formats). TopK only: ``encoder`` is a Linear(d_in, d_sae)
applied to x - b_dec, then the k largest ReLU'd pre-activations are decoded by ``W_dec`` (d_sae, d_in) + b_dec.

A sparsify run writes one such folder per hookpoint, named by it (``layers.15.mlp``) beside the run's
``config.json``; the folder name gives the site and that file the model."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from neurolight.lightning_modules.sae.formats.base import (
    SaeFormat,
    read_json,
    read_tensors,
    require,
    write_json,
    write_tensors,
)
from neurolight.lightning_modules.sae.formats.foreign import foreign_metadata, neurolight_blob

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"
# neurolight's own record (architecture, metadata) beside sparsify's files, not in cfg.json: sparsify's config loader
# logs every key it does not know, the whole record included, at each load.
EXTRA = "neurolight.json"
# The cfg.json keys of sparsify's SparseCoderConfig (sparsify 1.x) whose meaning the loader knows, plus d_in and the
# record that older neurolight exports kept in cfg.json.
_KNOWN_KEYS = frozenset(
    {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk", "skip_connection"}
    | {"transcode", "d_in", "neurolight"}
)


class SparsifyFormat(SaeFormat):
    name = "sparsify"
    files = f"a sparsify directory holds {CONFIG} + {WEIGHTS}"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()

    @classmethod
    def load(cls, path: Path):
        from neurolight.lightning_modules.sae.architectures import TopK, build_architecture
        from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

        cfg = read_json(path / CONFIG, "sparsify config")
        activation = cfg.get("activation", "topk")
        if activation != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
            raise ValueError(
                f"{path} is a sparsify coder with activation={activation}, transcode={cfg.get('transcode')}, "
                f"skip_connection={cfg.get('skip_connection')}; neurolight reads sparsify TopK autoencoders "
                "(activation topk, no transcoding, no skip connection)"
            )
        unknown = {key: value for key, value in cfg.items() if key not in _KNOWN_KEYS and value}
        if unknown:
            # A newer sparsify's option may change the encoder or decoder (it adds them to cfg.json): say so rather
            # than read the coder silently as a plain TopK autoencoder.
            warnings.warn(
                f"{path / CONFIG} sets {', '.join(f'{k}={v!r}' for k, v in unknown.items())}, which this neurolight "
                "does not know; it is read as a plain TopK autoencoder (encoder, top k, decoder): check that these "
                "options do not change its encoding or decoding before trusting its latents",
                stacklevel=2,
            )
        tensors = {name: t.float() for name, t in read_tensors(path / WEIGHTS, "sparsify weights").items()}
        require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / WEIGHTS)
        d_sae, d_in = tensors["encoder.weight"].shape
        if int(cfg.get("d_in", d_in)) != d_in or tuple(tensors["W_dec"].shape) != (d_sae, d_in):
            raise ValueError(
                f"{path}: encoder.weight {tuple(tensors['encoder.weight'].shape)} and W_dec "
                f"{tuple(tensors['W_dec'].shape)} do not match cfg.json's d_in={cfg.get('d_in')}"
            )
        # Exports before the record moved to EXTRA carry it in cfg.json.
        extra = read_json(path / EXTRA, "neurolight record") if (path / EXTRA).is_file() else cfg
        blob = neurolight_blob(extra)
        architecture = build_architecture(blob["architecture"]) if blob else TopK(k=int(cfg.get("k", 32)))
        sae = SparseAutoencoder(d_in, d_sae, architecture)
        with torch.no_grad():
            sae.W_enc.copy_(tensors["encoder.weight"])
            sae.b_enc.copy_(tensors["encoder.bias"])
            sae.W_dec.copy_(tensors["W_dec"])
            sae.b_dec.copy_(tensors["b_dec"])
        run = _run_config(path)
        hints = {"model_name": run.get("model"), "context_size": run.get("ctx_len"), "dataset_path": run.get("dataset")}
        if _names_a_site(path.name):  # a run's folder is named by its hookpoint; an export's by its user
            hints["hook_name"] = path.name
        sae.metadata = foreign_metadata({**hints, **({"neurolight": blob} if blob else {})}, {}, "sparsify", path)
        return sae

    @classmethod
    def cannot_hold(cls, sae) -> str | None:
        from neurolight.lightning_modules.sae.architectures import TopK

        if type(sae.architecture) is not TopK:
            return f"sparsify holds TopK autoencoders only, and this SAE is {type(sae.architecture).__name__}"
        return None

    @classmethod
    def save(cls, sae, directory: Path, firing_frequency: Tensor | None) -> list[Path]:
        from neurolight.lightning_modules.sae.architectures import architecture_config

        tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        folded = sae.metadata.activation_scale != 1.0
        cfg = {
            "activation": "topk",
            "expansion_factor": max(1, sae.d_sae // sae.d_in),
            # The folded normalisation leaves decoder rows at norm 1 / scale: sparsify must not renormalise them if
            # training continues there.
            "normalize_decoder": sae.normalize_decoder and not folded,
            "num_latents": sae.d_sae,
            "k": sae.architecture.k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": sae.d_in,
        }
        record = {"architecture": architecture_config(sae.architecture), "metadata": sae.metadata.to_dict()}
        written = [write_tensors(tensors, directory / WEIGHTS, "sparsify weights")]
        written.append(write_json(cfg, directory / CONFIG, "sparsify config"))
        written.append(write_json({"neurolight": record}, directory / EXTRA, "neurolight record"))
        return written


def _names_a_site(name: str) -> bool:
    from neurolight.datamodules.llm.hook_names import site_of_hook_name

    try:
        site_of_hook_name(name)
    except ValueError:
        return False
    return True


def _run_config(path: Path) -> dict:
    """The sparsify run's ``config.json`` beside the hookpoint folders (model, dataset, context length), if any."""
    run_file = path.parent / "config.json"
    if not run_file.is_file():
        return {}
    try:
        return read_json(run_file, "sparsify run config")
    except ValueError:
        return {}
