"""The interface of an SAE format, and what the formats share: folding a scale into the weights, and reading and
writing their files so that a bad file is named and a failed write leaves nothing under a real name."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from neurolight.datamodules.files import atomic_path

if TYPE_CHECKING:
    from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder


class SaeFormat(ABC):
    """One on-disk format. Every format holds an SAE that works on RAW activations: a training normalisation is
    folded into the weights before saving and after loading (docs/sae.md, Formats)."""

    name: ClassVar[str]
    """The name ``save_pretrained(format=...)`` and ``neurolight-export --format`` take."""
    files: ClassVar[str]
    """What a source in this format is, for the error on a source in no known format."""

    @classmethod
    @abstractmethod
    def detect(cls, path: Path) -> bool:
        """Whether ``path`` is a source in this format."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path) -> SparseAutoencoder:
        """The SAE at ``path``, in raw activation space, with its ``metadata`` filled as far as the source says."""

    @classmethod
    def cannot_hold(cls, sae: SparseAutoencoder) -> str | None:
        """Why this format cannot represent ``sae`` (None: it can)."""
        return None

    @classmethod
    @abstractmethod
    def save(cls, sae: SparseAutoencoder, directory: Path, firing_frequency: Tensor | None) -> list[Path]:
        """Write ``sae`` into ``directory`` (created); returns the files written. ``firing_frequency`` (d_sae,),
        when known, is written where the format has a place for it."""


@torch.no_grad()
def fold_input_scale_(sae: SparseAutoencoder, scale: float) -> None:
    """Make an SAE trained on ``scale * x`` take raw ``x``: (s x - b) W^T = (x - b / s)(s W)^T, and the output
    f W_dec + b comes back to raw space divided by s. The latents, hence every threshold and top-k choice, are
    unchanged (SAELens folds its ``expected_average_only_in`` factor the same way)."""
    if scale == 1.0:
        return
    if sae.free_decoder_norms:
        raise ValueError(
            "an SAE with free decoder norms keeps unit-norm decoder directions and cannot take an input scale; fold "
            "its norms first: sae = sae.with_unit_decoder() (docs/sae.md, Free decoder norms)"
        )
    sae.W_enc.mul_(scale)
    sae.W_dec.div_(scale)
    sae.b_dec.div_(scale)
    sae.metadata.activation_scale *= scale


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as file:
            data = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"cannot read the {what} {path} ({error}); the SAE directory is damaged: export it again"
        ) from error
    if not isinstance(data, dict):
        raise ValueError(f"the {what} {path} holds a {type(data).__name__}, not a JSON object")
    return data


def read_tensors(path: Path, what: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for truncated or corrupted files
        raise ValueError(
            f"cannot read the {what} {path} ({str(error).strip() or type(error).__name__}): truncated or not a "
            "safetensors file; export or download it again"
        ) from error


def require(tensors: dict[str, Tensor], names: tuple[str, ...], path: Path) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{path} lacks the tensors {', '.join(missing)} (has {', '.join(sorted(tensors))})")


def write_json(data: dict, path: Path, what: str) -> Path:
    with atomic_path(path, what) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_tensors(tensors: dict[str, Tensor], path: Path, what: str) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path, what) as temporary:
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, str(temporary))
        # safetensors creates its files 0600; an export is for sharing: the mode of any new file (umask applied).
        umask = os.umask(0)
        os.umask(umask)
        temporary.chmod(0o666 & ~umask)
    return path
