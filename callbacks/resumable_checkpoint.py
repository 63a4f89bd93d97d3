"""ResumableCheckpoint: a run that crashes or is preempted leaves a checkpoint to continue from.

- ``last.ckpt`` at the end of every training epoch (and of fit): resuming from it is bit-identical to a run that
  was never stopped, since every epoch's batch order depends only on (seed, epoch).
- ``mid_epoch.ckpt`` every ``every_n_train_steps`` steps and when the run is stopped by an exception, Ctrl-C
  (SIGINT) or a preemption (SIGTERM, which Lightning turns into an exception at the next batch): it continues
  from that step, but the rest of that epoch is drawn anew (Lightning warns so at resume). It is deleted once the
  epoch completes, so the newest state is always the one named in the last message.

Every file is written under a temporary name in the same folder and renamed into place, so a crash or a full
disk never leaves a truncated checkpoint under a real name. A subclass of ``ModelCheckpoint``, so
``--ckpt_path last`` finds ``last.ckpt``.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from neurolight.callbacks.run_folder import FolderHolder, refuse_other_runs_checkpoints, save_checkpoint_atomically

LAST = "last.ckpt"
MID_EPOCH = "mid_epoch.ckpt"


class ResumableCheckpoint(FolderHolder, ModelCheckpoint):
    def __init__(
        self, dirpath: str | None = None, every_n_train_steps: int | None = None, save_on_exception: bool = True
    ) -> None:
        """
        Args:
            dirpath: Folder of the checkpoints; default ``<trainer log dir>/checkpoints`` (the run's own folder).
            every_n_train_steps: Also write ``mid_epoch.ckpt`` every this many optimizer steps (null: only at epoch
                ends); for epochs that take hours.
            save_on_exception: Write ``mid_epoch.ckpt`` when the run stops on an exception, SIGINT or SIGTERM.
        """
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 or null, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, save_on_exception=save_on_exception)
        self.every_n_steps = every_n_train_steps

    @property
    def state_key(self) -> str:
        return f"ResumableCheckpoint[{self.every_n_steps}]"

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # resolves dirpath: the run's own folder
        if stage == "fit" and trainer.is_global_zero:
            self.hold(self.dirpath, "neurolight fit")

    def on_fit_start(self, trainer, pl_module) -> None:
        # Here, not in setup: Lightning knows the checkpoint a resumed run starts from only by now.
        if trainer.is_global_zero:
            refuse_other_runs_checkpoints(Path(self.dirpath), trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_as(trainer, MID_EPOCH)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_as(trainer, LAST)
            if trainer.is_global_zero:
                (Path(self.dirpath) / MID_EPOCH).unlink(missing_ok=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        """Nothing: the epoch-end checkpoint is written after validation, in ``on_train_epoch_end``."""

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_as(trainer, LAST)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        try:
            self._save_on_exception(trainer, exception)
        finally:
            self.release_folder()

    def _save_on_exception(self, trainer, exception: BaseException) -> None:
        # A second Ctrl-C (the first stops between steps, as SIGTERM does) means: out, now, whatever the state.
        if isinstance(exception, KeyboardInterrupt) or not self._should_save_on_exception(trainer):
            return
        try:
            path = self._save_as(trainer, MID_EPOCH)
        except OSError as error:  # a full disk: the run's own error is the one to report, not this one
            rank_zero_warn(f"{error}; no {MID_EPOCH} either")
            return
        rank_zero_info(
            f"{type(exception).__name__} at step {trainer.global_step}: saved {path}; continue with --ckpt_path {path} "
            f"(or --ckpt_path {Path(self.dirpath) / LAST}, the end of the last complete epoch, for an exact resume)"
        )

    def _save_as(self, trainer, name: str) -> Path:
        final = Path(self.dirpath) / name
        save_checkpoint_atomically(trainer, final, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = self.last_model_path = str(final)
        return final
