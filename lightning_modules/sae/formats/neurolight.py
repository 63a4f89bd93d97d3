"""neurolight's own SAE directory: ``neurolight_sae.json`` (sizes, architecture, metadata) and
``neurolight_sae.safetensors`` (the weights in raw activation space, under the SparseAutoencoder's own names).
Holds every architecture; ``firing_frequency.safetensors`` beside them when the firing statistics are known."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from neurolight.lightning_modules.sae.formats.base import (
    SaeFormat,
    read_json,
    read_tensors,
    require,
    write_json,
    write_tensors,
)
from neurolight.lightning_modules.sae.metadata import SaeMetadata

CONFIG, WEIGHTS, FREQUENCY = "neurolight_sae.json", "neurolight_sae.safetensors", "firing_frequency.safetensors"
VERSION = 1


class NeurolightFormat(SaeFormat):
    name = "neurolight"
    files = f"a neurolight directory holds {CONFIG} + {WEIGHTS}"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (path / CONFIG).is_file()

    @classmethod
    def load(cls, path: Path):
        from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

        config = read_json(path / CONFIG, "SAE config")
        if config.get("version", 0) > VERSION:
            raise ValueError(
                f"{path / CONFIG} is format version {config['version']}; this neurolight reads up to "
                f"{VERSION}: upgrade neurolight"
            )
        tensors = read_tensors(path / WEIGHTS, "SAE weights")
        require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), path / WEIGHTS)
        sae = SparseAutoencoder(int(config["d_in"]), int(config["d_sae"]), config["architecture"])
        sae.load_state_dict(tensors)
        sae.metadata = SaeMetadata.from_dict(config.get("metadata"))
        return sae

    @classmethod
    def save(cls, sae, directory: Path, firing_frequency: Tensor | None) -> list[Path]:
        from neurolight.lightning_modules.sae.architectures import architecture_config

        config = {
            "format": "neurolight-sae",
            "version": VERSION,
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            "architecture": architecture_config(sae.architecture),
            "metadata": sae.metadata.to_dict(),
        }
        written = [write_tensors(sae.state_dict(), directory / WEIGHTS, "SAE weights")]
        if firing_frequency is not None:
            written.append(write_tensors({"frequency": firing_frequency.float()}, directory / FREQUENCY, "frequencies"))
        # The config last: a directory is detected by it, so a failed write leaves no half-written SAE behind it.
        written.append(write_json(config, directory / CONFIG, "SAE config"))
        return written
