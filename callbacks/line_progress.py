"""LineProgress: one progress line every few seconds, for output that is not a terminal (a log file, a pipe, a batch
job), where a tqdm bar shows nothing until it ends. The ``neurolight`` command swaps it in for the tqdm bar when
stderr is not a terminal."""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

INTERVAL_ENV = "NEUROLIGHT_PROGRESS_SECONDS"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class LineProgress(ProgressBar):
    def __init__(self, interval_s: float = 30.0) -> None:
        """
        Args:
            interval_s: Seconds between progress lines (also ``$NEUROLIGHT_PROGRESS_SECONDS`` through the CLI).
        """
        super().__init__()
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._enabled = True
        self._started = self._printed = 0.0
        self._done = 0
        self._total: int | float = float("inf")

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _start(self) -> None:
        self._started = self._printed = time.monotonic()
        self._done = 0

    def _line(self, trainer, stage: str, done: int, total: int | float, final: bool = False) -> None:
        now = time.monotonic()
        if not self._started:  # a run resumed mid-epoch gets no epoch start
            self._start()
            now = self._started
        if not self._enabled or not trainer.is_global_zero or (not final and now - self._printed < self.interval_s):
            return
        self._printed = now
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        known = isinstance(total, int) and total > 0
        parts = [f"[{stage}]"]
        if stage == "fit":
            parts.append(f"epoch {trainer.current_epoch}")
        parts.append(f"batch {done}/{total if known else '?'}" + (f" ({100 * done / total:.0f}%)" if known else ""))
        parts.append(f"{rate:.2f} batches/s, {_duration(elapsed)} elapsed")
        if known and rate > 0 and not final:
            parts.append(f"ETA {_duration((total - done) / rate)}")
        metrics = {k: v for k, v in self.get_metrics(trainer, trainer.lightning_module).items() if k != "v_num"}
        if metrics:
            parts.append(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        print(f"{parts[0]} {', '.join(parts[1:])}", file=sys.stderr, flush=True)

    # fit
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start()
        # Read once, as tqdm's bar does: with max_steps Lightning reports the batches left, not the epoch's.
        self._total = self.total_train_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._done += 1
        self._line(trainer, "fit", self._done, self._total)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._line(trainer, "fit", self._done, self._total, final=True)

    # validate and test on their own (`neurolight validate`: an SAE evaluation reads thousands of contexts); the
    # validation inside fit's epochs is short and prints nothing of its own
    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if trainer.state.fn == "validate":
            self._done += 1
            self._line(trainer, "validate", self._done, self._eval_total(trainer.num_val_batches))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._line(trainer, "validate", self._done, self._eval_total(trainer.num_val_batches), final=True)

    def on_test_start(self, trainer, pl_module) -> None:
        self._start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._done += 1
        self._line(trainer, "test", self._done, self._eval_total(trainer.num_test_batches))

    def on_test_end(self, trainer, pl_module) -> None:
        self._line(trainer, "test", self._done, self._eval_total(trainer.num_test_batches), final=True)

    @staticmethod
    def _eval_total(totals: list) -> int | float:
        return sum(totals) if totals and all(isinstance(n, int) for n in totals) else float("inf")

    # predict
    def on_predict_start(self, trainer, pl_module) -> None:
        self._start()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._done += 1
        self._line(trainer, "predict", self._done, self._predict_total(trainer))

    def on_predict_end(self, trainer, pl_module) -> None:
        self._line(trainer, "predict", self._done, self._predict_total(trainer), final=True)

    def _predict_total(self, trainer) -> int | float:
        return self._eval_total(trainer.num_predict_batches)  # one per dataloader (the latent sampler has two passes)
