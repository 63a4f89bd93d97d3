"""SAE formats, one file each, found by name through ``FORMATS``: neurolight's checkpoints and directories,
SAELens's and sparsify's directories (docs/sae.md, Formats).

A new format is one new file with a subclass of ``SaeFormat`` (``base.py``) plus one line below.
``SparseAutoencoder.from_pretrained`` and ``save_pretrained`` are the entry points.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from neurolight.lightning_modules.sae.formats.base import SaeFormat, fold_input_scale_
from neurolight.lightning_modules.sae.formats.checkpoint import CheckpointFormat, load_sae_checkpoint
from neurolight.lightning_modules.sae.formats.neurolight import NeurolightFormat
from neurolight.lightning_modules.sae.formats.saelens import SaeLensFormat
from neurolight.lightning_modules.sae.formats.sparsify import SparsifyFormat

FORMATS: dict[str, type[SaeFormat]] = {
    "neurolight": NeurolightFormat,
    "saelens": SaeLensFormat,
    "sparsify": SparsifyFormat,
}
"""The directory formats, by the name ``save_pretrained(format=...)`` takes; checked in this order when loading
(neurolight's config file names it; SAELens and sparsify differ in their weights file)."""

__all__ = ["FORMATS", "SaeFormat", "detect_format", "fold_input_scale_", "load_sae", "load_sae_checkpoint", "save_sae"]


def detect_format(source: str | Path) -> type[SaeFormat]:
    """The format of ``source``, or an error that says what each format needs."""
    path = Path(source).expanduser()
    if path.is_file():
        return CheckpointFormat
    if not path.exists():
        raise FileNotFoundError(f"the SAE source {path} does not exist; {_what_each_format_needs()}")
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt
    inside = sorted(child.name for child in path.iterdir() if any(fmt.detect(child) for fmt in FORMATS.values()))
    if inside:
        raise ValueError(
            f"{path} holds SAEs in its subfolders ({', '.join(inside[:8])}{', ...' if len(inside) > 8 else ''}), e.g. "
            f"a sparsify run with one folder per hookpoint; pass one of them, e.g. {path / inside[0]}"
        )
    present = ", ".join(sorted(child.name for child in path.iterdir())[:8]) or "nothing"
    raise ValueError(f"{path} is in no known SAE format (it holds {present}); {_what_each_format_needs()}")


def _what_each_format_needs() -> str:
    return "; ".join([CheckpointFormat.files, *(fmt.files for fmt in FORMATS.values())])


def load_sae(source: str | Path, name: str | None = None):
    """The SparseAutoencoder at ``source`` in raw activation space (see ``SparseAutoencoder.from_pretrained``);
    ``name`` picks one SAE of a sweep's checkpoint."""
    path = Path(source).expanduser()
    fmt = detect_format(path)
    if fmt is CheckpointFormat:
        sae = fmt.load(path, name)
    elif name is not None:
        raise ValueError(f"{path} is a {fmt.name} directory of one SAE; a name ('{name}') picks an SAE of a sweep")
    else:
        sae = fmt.load(path)
    sae.metadata.source_format, sae.metadata.source = fmt.name, str(path)
    return sae.eval()


def save_sae(
    sae, directory: str | Path, format: str = "neurolight", firing_frequency: Tensor | None = None
) -> list[Path]:
    """Write ``sae`` (raw activation space) into ``directory`` in ``format``; returns the files written."""
    if format not in FORMATS:
        raise ValueError(f"unknown SAE format '{format}'; choose one of {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    if format != "neurolight":
        # Other formats hold unit-norm rows; free decoder norms fold into the weights (docs/sae.md, Free decoder norms).
        sae = sae.with_unit_decoder()
    reason = fmt.cannot_hold(sae)
    if reason is not None:
        able = [name for name, other in FORMATS.items() if other.cannot_hold(sae) is None]
        raise ValueError(f"the {format} format cannot hold this SAE: {reason}; formats that can: {', '.join(able)}")
    if firing_frequency is not None and tuple(firing_frequency.shape) != (sae.d_sae,):
        raise ValueError(f"firing_frequency has shape {tuple(firing_frequency.shape)}; it must be ({sae.d_sae},)")
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    return fmt.save(sae, directory, firing_frequency)
