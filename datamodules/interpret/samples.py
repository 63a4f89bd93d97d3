"""The on-disk format of interpretation samples: what the latent sampler writes and the interpreter reads.

A samples directory holds two files:

``metadata.json``
    ``format_version`` (1) and how the samples were made: ``sae_checkpoint``, ``model_name``, ``layer_id``,
    ``layer_type``, ``d_in``, ``d_sae``, ``architecture`` (its registered name), ``architecture_settings``,
    ``learning_rate``, ``l1_coefficient``, ``activation_scale`` (the SAE's normalisation scalar, applied as in
    training), ``num_tokens`` (context length), ``frequency_tokens`` (tokens of the frequency pass),
    ``num_samples`` (contexts scanned by the sampling pass), ``log_freq_lower`` / ``log_freq_upper`` and
    ``below_band`` / ``above_band`` (latents left out on each side), ``exclude_first_position``. Writers may add
    keys; readers ignore what they do not know.

``samples.safetensors``
    ``latents`` (L,) int64
        The kept latents (indices into the SAE's d_sae), ascending.
    ``frequency`` (d_sae,) float64
        Firing frequency (fraction of tokens with activation > 0) of EVERY latent in the frequency pass.
    ``max_activation`` (L,) float32
        Largest activation of each kept latent over the sampling pass.
    ``contexts`` (U, T) int64 and ``context_index`` (U,) int64
        Token ids of every context referenced below, and its index in the tokenized corpus.
    ``{kind}_context`` (L, n_kind) int64 and ``{kind}_activations`` (L, n_kind, T) float32, for each kind
        ``top`` (highest MAX activation, in descending order), ``quantile`` (contexts sampled across the
        activation quantiles of contexts where the latent fires, lowest quantile first), ``random`` (uniformly
        random contexts) and ``negative`` (random contexts where the latent never fires): a row of ``contexts``
        per slot, -1 for an empty slot, and the latent's activation at every token of that context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from neurolight.datamodules.files import atomic_path

FORMAT_VERSION = 1
KINDS = ("top", "quantile", "random", "negative")
"""Kinds of records, in the order they are stored."""

_META = "metadata.json"
_TENSORS = "samples.safetensors"


class Record(NamedTuple):
    """One context shown for one latent."""

    kind: str
    """``top``, ``quantile``, ``random`` or ``negative``."""
    context_index: int
    """Index of the context in the tokenized corpus."""
    token_ids: Tensor
    """(T,) int64 token ids."""
    activations: Tensor
    """(T,) float32 activation of the latent at every token (0 where it does not fire)."""


def save_interpretation_samples(path: str | Path, tensors: dict[str, Tensor], metadata: dict) -> Path:
    """Write a samples directory; files are written under temporary names and renamed, so a crash leaves no
    half-written samples behind."""
    missing = [name for name in _required_tensors() if name not in tensors]
    if missing:
        raise ValueError(f"interpretation samples lack tensors {missing}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # The tensors first: a directory is complete only once its metadata exists.
    with atomic_path(path / _TENSORS, "interpretation samples") as temporary:
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temporary))
        except SafetensorError as error:  # its I/O errors (a full disk) are not OSErrors
            raise OSError(str(error)) from error
    with atomic_path(path / _META, "interpretation samples' metadata") as temporary:
        temporary.write_text(json.dumps({"format_version": FORMAT_VERSION, **metadata}, indent=2, default=str))
    return path


def _required_tensors() -> list[str]:
    names = ["latents", "frequency", "max_activation", "contexts", "context_index"]
    for kind in KINDS:
        names += [f"{kind}_context", f"{kind}_activations"]
    return names


class InterpretationSamples:
    """Read access to a samples directory written by :func:`save_interpretation_samples`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta, tensors = self.path / _META, self.path / _TENSORS
        if not meta.is_file() or not tensors.is_file():
            raise FileNotFoundError(
                f"{self.path} is not an interpretation-samples directory (expected {_META} and {_TENSORS}); "
                "write one with the latent sampler: neurolight predict --config configs/interpret/sample.yaml"
            )
        self.metadata: dict = json.loads(meta.read_text())
        version = self.metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{self.path}: samples format version {version}; this neurolight reads {FORMAT_VERSION}")
        try:
            self.tensors = load_file(str(tensors))
        except Exception as error:  # safetensors raises its own error types for a truncated or foreign file
            raise ValueError(
                f"{tensors} is truncated or corrupted ({error}); write the samples again: neurolight predict "
                "--config configs/interpret/sample.yaml (a killed run continues from its .resume/ snapshots)"
            ) from None
        self.latents: Tensor = self.tensors["latents"]
        self.frequency: Tensor = self.tensors["frequency"]
        self.max_activation: Tensor = self.tensors["max_activation"]
        self._row = {int(latent): row for row, latent in enumerate(self.latents.tolist())}

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, latent: int) -> bool:
        return int(latent) in self._row

    def records(self, latent: int, kind: str) -> list[Record]:
        """The stored records of one kind for one latent, empty slots skipped, in stored order."""
        if kind not in KINDS:
            raise ValueError(f"unknown record kind '{kind}'; choose one of {', '.join(KINDS)}")
        if int(latent) not in self._row:
            raise KeyError(f"latent {latent} is not among the {len(self)} sampled latents of {self.path}")
        row = self._row[int(latent)]
        slots = self.tensors[f"{kind}_context"][row]
        acts = self.tensors[f"{kind}_activations"][row]
        contexts, corpus_index = self.tensors["contexts"], self.tensors["context_index"]
        return [
            Record(kind, int(corpus_index[slot]), contexts[slot], acts[i].float())
            for i, slot in enumerate(slots.tolist())
            if slot >= 0
        ]

    def all_records(self, latent: int) -> dict[str, list[Record]]:
        return {kind: self.records(latent, kind) for kind in KINDS}


def empty_slots(num_latents: int, slots: int, num_tokens: int) -> tuple[Tensor, Tensor]:
    """Context rows (all -1) and activations (all 0) for ``slots`` records of ``num_latents`` latents."""
    return (
        torch.full((num_latents, slots), -1, dtype=torch.long),
        torch.zeros(num_latents, slots, num_tokens, dtype=torch.float32),
    )
