"""InterpretationSamplesWriter: writes what ``lightning_modules.LatentSampler`` selected as a samples directory.

The directory's format is documented in ``datamodules.interpretation_samples``; the interpreter reads it. Under
DDP the sampler merges every rank's selections (exactly what one process would select) and global rank zero writes.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from datamodules.interpretation_samples import save_interpretation_samples


class InterpretationSamplesWriter(BasePredictionWriter):
    def __init__(self, save_path: str, overwrite: bool = False) -> None:
        """
        Args:
            save_path: Directory to write ``metadata.json`` and ``samples.safetensors`` to (the original script's
                ``--save_path``).
            overwrite: Replace the samples in an existing, non-empty ``save_path``; without it such a directory is
                refused before any work is done.
        """
        super().__init__(write_interval="epoch")
        self.save_path = Path(save_path).expanduser()
        self.overwrite = overwrite
        self.written: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not hasattr(pl_module, "finalize"):
            raise TypeError(
                f"InterpretationSamplesWriter writes the samples of a LatentSampler; the model is a "
                f"{type(pl_module).__name__}"
            )
        if self.save_path.exists() and not self.save_path.is_dir():
            raise FileExistsError(f"save_path {self.save_path} is a file; choose a directory path")
        if self.save_path.is_dir() and any(self.save_path.iterdir()) and not self.overwrite:
            raise FileExistsError(
                f"save_path {self.save_path} exists and is not empty; choose another save_path or set overwrite: true"
            )

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        final = pl_module.finalize()  # every rank takes part in the merge; rank zero gets the result
        if final is None:
            return
        tensors, metadata = final
        self.written = save_interpretation_samples(self.save_path, tensors, metadata)
        print(summary(metadata, self.written))


def summary(metadata: dict, path: Path) -> str:
    lower, upper = metadata["log_freq_lower"], metadata["log_freq_upper"]
    return "\n".join(
        [
            "",
            "interpretation samples written",
            f"  latents kept: {metadata['num_latents']} of {metadata['d_sae']} ({lower} < log10 f < {upper} over "
            f"{metadata['frequency_tokens']:,} tokens)",
            f"  left out:     {metadata['below_band']} below ({metadata['never_fired']} never fired), "
            f"{metadata['above_band']} above",
            f"  contexts:     {metadata['num_samples']:,} scanned, {metadata['num_tokens']} tokens each",
            f"  samples:      {path}",
        ]
    )
