"""SAELens's SAE directory: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``, log10 firing
frequencies), as ``SAE.save_model`` writes it and ``SAE.load_from_disk`` reads it (docs/sae.md, Formats).

SAELens's ``W_enc`` is (d_in, d_sae), the transpose of neurolight's. Architectures: ``standard`` is neurolight's
ReLU, ``topk`` its TopK, ``jumprelu`` its JumpReLU; SAELens publishes BatchTopK SAEs as ``jumprelu`` with one
threshold for every latent and ``training_architecture: batchtopk`` in the metadata, which is how neurolight writes
its BatchTopK (and Matryoshka BatchTopK) SAEs too, and reads them back. A ``batchtopk`` directory (SAELens's training
format, with the scalar ``topk_threshold``) is read as well. ``rescale_acts_by_decoder_norm``,
``apply_b_dec_to_input: false`` and a known ``expected_average_only_in`` factor are folded into the weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from neurolight.lightning_modules.sae.formats.base import (
    SaeFormat,
    fold_input_scale_,
    read_json,
    read_tensors,
    require,
    write_json,
    write_tensors,
)
from neurolight.lightning_modules.sae.formats.foreign import (
    foreign_metadata,
    neurolight_blob,
    published_model_name,
)

CONFIG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
# The activation scaler that SAELens's trainer saves with each checkpoint (ACTIVATION_SCALER_CFG_FILENAME).
SCALER = "activation_scaler.json"
READS = ("standard", "topk", "batchtopk", "jumprelu")
# The SAELens config version this writer follows; without one SAELens reads a config by its pre-6.0 rules.
_WRITES_VERSION = "6.0.0"
# SAELens's log10 of a never-firing latent's frequency (its trainer adds this before the log).
_SPARSITY_EPS = 1e-10


class SaeLensFormat(SaeFormat):
    name = "saelens"
    files = f"a SAELens directory holds {CONFIG} + {WEIGHTS}"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()

    # ---------------------------------------------------------------------------------------------------- load
    @classmethod
    def load(cls, path: Path):
        from neurolight.lightning_modules.sae.architectures import BatchTopK, JumpReLU, ReLU, TopK, build_architecture
        from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

        cfg = read_json(path / CONFIG, "SAELens config")
        meta = cfg.get("metadata") or {}
        architecture_name = _architecture(cfg, path)
        if architecture_name not in READS:
            raise ValueError(
                f"{path} holds a SAELens '{architecture_name}' SAE; neurolight reads the SAELens architectures "
                f"{', '.join(READS)}"
            )
        tensors = {name: t.float() for name, t in read_tensors(path / WEIGHTS, "SAELens weights").items()}
        require(tensors, ("W_enc", "W_dec", "b_dec"), path / WEIGHTS)
        W_enc, W_dec, b_dec = tensors["W_enc"].T.contiguous(), tensors["W_dec"], tensors["b_dec"]
        d_sae, d_in = W_dec.shape
        if (
            tuple(W_enc.shape) != (d_sae, d_in)
            or int(cfg.get("d_in", d_in)) != d_in
            or int(cfg.get("d_sae", d_sae)) != d_sae
        ):
            raise ValueError(
                f"{path}: the weights (W_enc {tuple(tensors['W_enc'].shape)}, W_dec {tuple(W_dec.shape)}) do not "
                f"match cfg.json's d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')}"
            )
        b_enc = tensors.get("b_enc", torch.zeros(d_sae))
        if not cfg.get("apply_b_dec_to_input", True):
            # SAELens encodes x @ W_enc + b_enc; neurolight subtracts b_dec first: move it into the bias.
            b_enc = b_enc + W_enc @ b_dec
        if architecture_name in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False):
            # Pre-activations scaled by ||W_dec row|| and a decoder divided by it: the same SAE with unit rows.
            norms = W_dec.norm(dim=1).clamp_min(1e-8)
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]

        blob = neurolight_blob(meta)
        details = meta.get("training_architecture_details") or {}
        threshold = tensors.get("threshold")
        if blob is not None:
            architecture = build_architecture(blob["architecture"])
        elif architecture_name == "standard":
            architecture = ReLU()
        elif architecture_name == "topk":
            architecture = TopK(k=_int_k(cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k")), path))
        elif architecture_name == "batchtopk":
            architecture = BatchTopK(k=_int_k(cfg.get("k"), path))
            threshold = tensors.get("topk_threshold", torch.tensor(-1.0))
        elif _uniform_batchtopk(meta, threshold):
            architecture = BatchTopK(k=_int_k(details.get("k"), path))
        else:
            architecture = JumpReLU()
        sae = SparseAutoencoder(d_in, d_sae, architecture)
        with torch.no_grad():
            sae.W_enc.copy_(W_enc)
            sae.b_enc.copy_(b_enc)
            sae.W_dec.copy_(W_dec)
            sae.b_dec.copy_(b_dec)
            if isinstance(architecture, JumpReLU):
                require(tensors, ("threshold",), path / WEIGHTS)
                # SAELens's JumpReLU is ReLU(z) * (z > θ); neurolight's z * (z > θ) with θ > 0 through log θ. A θ <= 0
                # becomes the smallest positive float, where the two agree on every z above it.
                sae.log_threshold.copy_(threshold.clamp_min(torch.finfo(torch.float32).tiny).log())
            elif isinstance(architecture, BatchTopK):
                value = threshold.reshape(-1)[0] if threshold is not None and threshold.numel() else torch.tensor(-1.0)
                sae.threshold.copy_(value.float())
        sae.metadata = foreign_metadata(meta, cfg, "saelens", path)
        scale = _normalisation_scale(cfg, path)
        fold_input_scale_(sae, scale)
        return sae

    # ---------------------------------------------------------------------------------------------------- save
    @classmethod
    def cannot_hold(cls, sae) -> str | None:
        from neurolight.lightning_modules.sae.architectures import BatchTopK, JumpReLU, ReLU, TopK

        architecture = sae.architecture
        if type(architecture) in (ReLU, TopK) or isinstance(architecture, (BatchTopK, JumpReLU)):
            if isinstance(architecture, BatchTopK) and float(sae.threshold) < 0:
                return (
                    f"its {type(architecture).__name__} inference threshold is not estimated yet (it is, during "
                    "training); train it for at least one step"
                )
            return None
        return f"SAELens has no inference architecture for {type(architecture).__name__}"

    @classmethod
    def save(cls, sae, directory: Path, firing_frequency: Tensor | None) -> list[Path]:
        from neurolight.datamodules.llm.hook_names import transformer_lens_hook_name
        from neurolight.lightning_modules.sae.architectures import (
            BatchTopK,
            JumpReLU,
            TopK,
            architecture_config,
            architecture_name,
        )

        architecture, meta = sae.architecture, sae.metadata
        tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        extra: dict = {}
        metadata = {
            "sae_lens_version": _WRITES_VERSION,
            "sae_lens_training_version": None,
            "model_name": published_model_name(meta.model_name),
            "hook_name": (
                transformer_lens_hook_name(meta.layer_type, meta.layer_id)
                if meta.layer_type is not None and meta.layer_id is not None
                else meta.hook_name
            ),
            "hook_head_index": None,
            "context_size": meta.context_size,
            "dataset_path": meta.dataset,
            "prepend_bos": True,
            "neurolight": {"architecture": architecture_config(architecture), "metadata": meta.to_dict()},
        }
        if isinstance(architecture, BatchTopK):
            name = "jumprelu"
            tensors["threshold"] = sae.threshold.expand(sae.d_sae).float()
            metadata["training_architecture"] = architecture_name(architecture)
            metadata["training_architecture_details"] = {"k": architecture.k}
        elif isinstance(architecture, JumpReLU):
            name = "jumprelu"
            tensors["threshold"] = sae.log_threshold.exp()
        elif isinstance(architecture, TopK):
            name = "topk"
            extra = {"k": architecture.k, "rescale_acts_by_decoder_norm": False}
        else:
            name = "standard"
        cfg = {
            "architecture": name,
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            **extra,
            "metadata": metadata,
        }
        written = [write_tensors(tensors, directory / WEIGHTS, "SAELens weights")]
        if firing_frequency is not None:
            log10 = (firing_frequency.double() + _SPARSITY_EPS).log10().float()
            written.append(write_tensors({"sparsity": log10}, directory / SPARSITY, "SAELens sparsity"))
        written.append(write_json(cfg, directory / CONFIG, "SAELens config"))
        return written


def _architecture(cfg: dict, path: Path) -> str:
    version = str(cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version") or "")
    major = version.split(".")[0]
    if major.isdigit() and int(major) >= 6:
        return str(cfg.get("architecture") or "standard")
    # Written before SAELens 6 (no version, or below 6), a config says "architecture": "standard" also for a TopK
    # SAE, which it names by its activation function; SAELens's own loader reads it so (handle_pre_6_0_config).
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if activation == "topk":
        return "topk"
    if activation != "relu":
        raise ValueError(
            f"{path} is a SAELens SAE from before version 6 with activation_fn {activation!r}; neurolight reads relu "
            "(standard, jumprelu) and topk SAEs"
        )
    return str(cfg.get("architecture") or "standard")


def _int_k(k, path: Path) -> int:
    if k is None or float(k) != int(float(k)) or int(float(k)) < 1:
        raise ValueError(f"{path}: k={k!r} is not a positive whole number of latents; neurolight's TopK needs one")
    return int(float(k))


def _uniform_batchtopk(meta: dict, threshold: Tensor | None) -> bool:
    """A SAELens BatchTopK SAE saved for inference: jumprelu with one threshold for all latents."""
    trained_as = str(meta.get("training_architecture") or "")
    return (
        trained_as.endswith("batchtopk")
        and threshold is not None
        and bool((threshold == threshold.reshape(-1)[0]).all())
        and float(threshold.reshape(-1)[0]) > 0
        and (meta.get("training_architecture_details") or {}).get("k") is not None
    )


def _normalisation_scale(cfg: dict, path: Path) -> float:
    """The factor SAELens's weights expect raw activations to be multiplied by (1: none)."""
    mode = cfg.get("normalize_activations", "none")
    if isinstance(mode, bool):  # configs before SAELens 6
        mode = "expected_average_only_in" if mode else "none"
    if mode in (None, "none"):
        return 1.0
    if mode == "expected_average_only_in":
        factor = cfg.get("norm_scaling_factor") or (cfg.get("metadata") or {}).get("norm_scaling_factor")
        if factor is None and (path / SCALER).is_file():
            # A checkpoint SAELens wrote during training: its trainer folds the factor into the weights only at the
            # end, and keeps it meanwhile in the scaler's file beside the weights.
            factor = read_json(path / SCALER, "SAELens activation scaler").get("scaling_factor")
        if factor is None or not math.isfinite(float(factor)):
            raise ValueError(
                f"{path / CONFIG} says normalize_activations: expected_average_only_in but records no "
                f"norm_scaling_factor, and no {SCALER} beside it holds one: the weights expect activations scaled by "
                "a factor the directory does not hold; add norm_scaling_factor to cfg.json (SAELens's trainer logs "
                "it) or fold it with SAELens first"
            )
        return float(factor)
    raise ValueError(
        f"{path / CONFIG} says normalize_activations: {mode}, a per-token normalisation that cannot be folded into "
        "the weights; neurolight reads SAEs with normalize_activations none or expected_average_only_in"
    )
