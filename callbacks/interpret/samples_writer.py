"""InterpretationSamplesWriter: writes what ``neurolight.lightning_modules.LatentSampler`` selected as a samples
directory.

The directory's format is documented in ``neurolight.datamodules.interpret.samples``; the interpreter reads it. Under
DDP the sampler merges every rank's selections (exactly what one process would select) and global rank zero writes.

- Resume: every ``snapshot_every_n_contexts`` contexts each rank saves its progress to
  ``<save_path>/.resume/rank{r}.pt`` (``neurolight.callbacks.interpret.sampler_snapshot``). Rerunning the same command
  after a kill continues from there: the
  contexts already taken in are neither read nor run through the LLM again, and the samples are those of one
  uninterrupted run. A snapshot of other settings is refused (``overwrite`` discards it); the folder is removed
  once the samples are written.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from neurolight.callbacks.interpret.sampler_snapshot import FOLDER, SamplerSnapshots, fingerprint, progress_state
from neurolight.callbacks.run_folder import LOCK_FILE, FolderHolder
from neurolight.datamodules.interpret.samples import save_interpretation_samples


class InterpretationSamplesWriter(FolderHolder, BasePredictionWriter):
    def __init__(self, save_path: str, overwrite: bool = False, snapshot_every_n_contexts: int | None = 4096) -> None:
        """
        Args:
            save_path: Directory to write ``metadata.json`` and ``samples.safetensors`` to.
            overwrite: Replace the samples in an existing, non-empty ``save_path``, and discard the progress
                snapshot of a killed run with other settings; without it either is refused before any work is
                done. A directory that holds only a killed run's snapshot is not refused: the run continues.
            snapshot_every_n_contexts: Save each rank's progress to ``save_path/.resume`` after every this many
                contexts it takes in (null: never), so that rerunning the same command after a kill continues from
                there. In the sampling pass a snapshot holds all kept latents' samples (as much as they take on the
                device).
        """
        super().__init__(write_interval="epoch")
        if snapshot_every_n_contexts is not None and snapshot_every_n_contexts < 1:
            raise ValueError(
                f"snapshot_every_n_contexts={snapshot_every_n_contexts} must be at least 1 (contexts), or null for "
                "no snapshots"
            )
        self.save_path = Path(save_path).expanduser()
        self.overwrite = overwrite
        self.snapshot_every_n_contexts = snapshot_every_n_contexts
        self.written: Path | None = None
        self._snapshots: SamplerSnapshots | None = None
        self._unsaved = 0  # contexts taken in since the last snapshot

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not hasattr(pl_module, "finalize") or not hasattr(pl_module, "resume_from"):
            raise TypeError(
                f"InterpretationSamplesWriter writes the samples of a LatentSampler; the model is a "
                f"{type(pl_module).__name__}"
            )
        if self.save_path.exists() and not self.save_path.is_dir():
            raise FileExistsError(f"save_path {self.save_path} is a file; choose a directory path")
        if trainer.is_global_zero:  # a live run's folder (and its .resume/) is never touched, overwrite or not
            self.hold(self.save_path, "neurolight predict: interpretation samples")
        contents = [p for p in self.save_path.iterdir() if not _leftover(p.name)] if self.save_path.is_dir() else []
        if contents and not self.overwrite:
            raise FileExistsError(
                f"save_path {self.save_path} exists and is not empty; choose another save_path or set overwrite: true"
            )
        self._snapshots, self._unsaved = SamplerSnapshots(self.save_path, trainer.global_rank), 0
        self._resume(trainer, pl_module)

    def _resume(self, trainer, pl_module) -> None:
        """Give this rank's snapshot back to the sampler and the datamodule, after rank zero checked that every
        snapshot was taken with these settings (one reader, so the ranks cannot disagree)."""
        snapshots = self._snapshots
        found = trainer.is_global_zero and snapshots.exist()
        problem = snapshots.mismatch(fingerprint(pl_module)) if found else None
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            if not self.overwrite:
                raise ValueError(
                    f"{snapshots.folder} holds the progress of a killed run with other settings ({problem}); rerun "
                    f"with its settings to continue it, or delete {snapshots.folder} or set overwrite: true to start "
                    "afresh"
                )
            if trainer.is_global_zero:
                print(
                    f"overwrite: discarding {snapshots.folder}, a killed run's progress with other settings ({problem})"
                )
                snapshots.remove()
            trainer.strategy.barrier("InterpretationSamplesWriter.discard")  # gone before any rank saves anew
        state = snapshots.load() if problem is None else None
        pl_module.resume_from(state)
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "skip_contexts"):
            raise TypeError(
                f"resuming needs neurolight.datamodules.CorpusContextDataModule, not {type(datamodule).__name__}"
            )
        done = state["contexts_done"].tolist() if state is not None else [0, 0]
        datamodule.skip_contexts(done)
        if state is not None:
            step = state["pass"]
            prefix = f"rank {trainer.global_rank}: " if trainer.world_size > 1 else ""
            print(
                f"{prefix}resuming pass {step} ({('frequency', 'sampling')[step]}) at context {done[step]:,} of "
                f"{datamodule.rank_contexts()[step]:,} from {snapshots.path}",
                flush=True,  # one whole line per rank
            )

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.snapshot_every_n_contexts is None:
            return
        self._unsaved += int(outputs)  # LatentSampler.predict_step returns the contexts it took in
        # After the last batch only the writing is left, and a run resumed there would have no batch to predict
        # (Lightning then skips the epoch end that writes): it redoes that batch instead.
        last_loader = len(trainer.num_predict_batches) - 1
        last = dataloader_idx == last_loader and batch_idx == trainer.num_predict_batches[last_loader] - 1
        if self._unsaved >= self.snapshot_every_n_contexts and not last:
            self._snapshots.save(progress_state(pl_module))
            self._unsaved = 0

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        final = pl_module.finalize()  # every rank takes part in the merge; rank zero gets the result
        if final is None:
            return
        tensors, metadata = final
        self.written = save_interpretation_samples(self.save_path, tensors, metadata)
        self._snapshots.remove()  # every rank's: the other ranks have taken their last snapshot before the merge
        print(summary(metadata, self.written))


def _leftover(name: str) -> bool:
    """A killed run leaves its snapshot, and perhaps the hidden temporary files of an unfinished write: no samples."""
    return name in (FOLDER, LOCK_FILE) or (name.startswith(".") and name.endswith(".tmp"))


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
