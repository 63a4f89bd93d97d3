"""SaeCheckpoint: a resumable checkpoint every N steps and at the end, each with a feature-density histogram.

The checkpoint is a full Lightning checkpoint (weights, Adam state, normalisation scalar, callback and buffer
state), so ``neurolight fit ... --ckpt_path <file>`` continues the run. Next to it a PNG shows log10 of each
latent's firing frequency over the steps since the previous checkpoint, with the dead count in the title.
Needs a ``training_step`` that returns ``fired`` (per-latent counts) and ``num_tokens``, both over all ranks. Of a
``SparseAutoencoderSweep`` each member gets its own histogram, ``{checkpoint}_{member}_feature_density.png``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from neurolight.callbacks.run_folder import (
    FolderHolder,
    refuse_other_runs_checkpoints,
    run_directory,
    save_checkpoint_atomically,
)
from neurolight.lightning_modules.sae.sweep import units_of

# Firing frequencies of dead latents are drawn at this log10 value, left of every live one.
_DEAD_LOG_FREQ = -10.0


class SaeCheckpoint(FolderHolder, Callback):
    def __init__(self, batches_between_ckpt: int = 5000, dirpath: str | None = None, save_final: bool = True) -> None:
        """
        Args:
            batches_between_ckpt: Steps between checkpoints (and histograms).
            dirpath: Where to write; default ``<trainer log dir>/checkpoints``.
            save_final: Also write ``last.ckpt`` and its histogram when training ends.
        """
        if batches_between_ckpt < 1:
            raise ValueError(f"batches_between_ckpt must be >= 1, got {batches_between_ckpt}")
        self.every = batches_between_ckpt
        self.dirpath = dirpath
        self.save_final = save_final
        self.fired: dict[str, Tensor] | None = None  # the window's firing counts per SAE ("" for a single one)
        self.tokens = 0
        self.written: list[str] = []
        self._previous_window: tuple[dict[str, Tensor], float] | None = None
        self._trained = False  # whether this fit ran a training step loop (a finished one resumed does not)

    @property
    def state_key(self) -> str:
        return f"SaeCheckpoint[{self.every}]"

    def directory(self, trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return run_directory(trainer) / "checkpoints"

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Last among the callbacks (as Lightning orders its own checkpoint callbacks): a checkpoint then holds what
        # the others did at its step, such as a resampling, and resuming from it repeats none of it. A new list, not
        # remove/append: Lightning is iterating over the old one to call setup, and would skip the next callback's.
        trainer.callbacks = [callback for callback in trainer.callbacks if callback is not self] + [self]
        if stage == "fit" and trainer.is_global_zero:
            self.hold(self.directory(trainer), "neurolight fit")

    def on_fit_start(self, trainer, pl_module) -> None:
        # Here, not in setup: Lightning knows the checkpoint a resumed run starts from only by now.
        if trainer.is_global_zero:
            refuse_other_runs_checkpoints(self.directory(trainer), trainer)
        self._trained = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._trained = True

    def _final_step(self, trainer) -> bool:
        """Whether this step ends training (``max_steps``). Its step checkpoint is written at ``on_train_end``, after
        the validation that may follow the step: one written here would resume into a finished loop, which runs
        neither that validation nor ``on_train_end`` (no ``last.ckpt``)."""
        return self.save_final and 0 < trainer.max_steps <= trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        units = units_of(pl_module, outputs)
        if self.fired is None:
            self.fired = {}
        for name, _, output in units:
            fired = output["fired"].detach()
            self.fired[name] = fired.clone() if name not in self.fired else self.fired[name].to(fired.device) + fired
        self.tokens += int(units[0][2]["num_tokens"])  # every SAE of a sweep takes in the same batch
        if trainer.global_step % self.every == 0 and not self._final_step(trainer):
            self._save(trainer, f"step_{trainer.global_step:07d}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning stops on SIGTERM (and the neurolight command on a first Ctrl-C) between two steps, where the
        # state is whole: that state is a checkpoint like any other. Any other exception may have struck mid-step.
        try:
            if isinstance(exception, SIGTERMException) and self.fired is not None:
                self._save(trainer, f"step_{trainer.global_step:07d}")
                if trainer.is_global_zero:
                    print(f"stopped at step {trainer.global_step}; continue with --ckpt_path {self.written[-1]}")
        finally:
            self.release_folder()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.fired is not None and trainer.global_step % self.every == 0 and self._final_step(trainer):
            self._save(trainer, f"step_{trainer.global_step:07d}")
        if self.save_final and self.fired is not None:
            # Training often ends right on a periodic checkpoint: then "last" shows that same window again.
            window = self._previous_window if self.tokens == 0 else None
            self._save(trainer, "last", window)
        if trainer.is_global_zero:
            print(self.summary(trainer))

    def on_fit_end(self, trainer, pl_module) -> None:
        # Resumed from a checkpoint of a finished run (killed while writing last.ckpt, or a final step checkpoint of
        # an older neurolight): Lightning skips the finished loop with every training hook, so last.ckpt is written
        # here, from the restored state.
        if not self._trained and self.save_final and self.fired is not None and trainer.state.fn == "fit":
            self._save(trainer, "last")
            if trainer.is_global_zero:
                print(self.summary(trainer))

    def _save(self, trainer, name: str, window: tuple[dict[str, Tensor], float] | None = None) -> None:
        if window is None:
            # Counts are already summed over ranks by the module.
            window = ({unit: fired.cpu().clone() for unit, fired in self.fired.items()}, float(self.tokens))
            self._previous_window = window
        counts, tokens = window
        directory = self.directory(trainer)
        path = directory / f"{name}.ckpt"
        # Reset the window before saving so that the checkpoint holds the state the next step expects.
        for fired in self.fired.values():
            fired.zero_()
        self.tokens = 0
        save_checkpoint_atomically(trainer, path)  # optimizer, loops and callbacks too: resumable
        if trainer.is_global_zero:
            if tokens > 0:  # a checkpoint written with no step since the last one has no window to show
                for unit, fired in counts.items():
                    plot_feature_density(fired, tokens, directory / _picture(name, unit), trainer.global_step)
            self.written.append(str(path))

    def summary(self, trainer) -> str:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, Tensor) and v.numel() == 1}
        lines = ["", "SAE training finished"]
        units = list(self.fired) if self.fired else [""]  # a sweep's members, or "" for one SAE
        last = Path(self.written[-1]) if self.written else None
        if last is not None:
            lines.append(f"  checkpoint: {last}")
        if trainer.logger is not None and trainer.logger.log_dir:
            lines.append(f"  metrics:    {trainer.logger.log_dir}")
        keys = ("train/l0", "train/explained_variance", "val/explained_variance", "val/ce_loss_recovered")
        if units == [""]:
            if last is not None:
                lines.append(f"  histogram:  {last.with_name(_picture(last.stem, ''))}")
            lines += [f"  {key}: {metrics[key]:.4g}" for key in keys if key in metrics]
            return "\n".join(lines)
        # A sweep: one row per member, so that its SAEs compare at a glance.
        if last is not None:
            lines.append(f"  histograms: {last.with_name(_picture(last.stem, '{name}'))}")
        shown = [key for key in keys if any(f"{unit}/{key}" in metrics for unit in units)]
        width = max(len("member"), *map(len, units))
        lines.append("  " + "  ".join(["member".ljust(width), *(f"{key:>24}" for key in shown)]))
        for unit in units:
            cells = [
                f"{metrics[f'{unit}/{key}']:>24.4g}" if f"{unit}/{key}" in metrics else f"{'-':>24}" for key in shown
            ]
            lines.append("  " + "  ".join([unit.ljust(width), *cells]))
        return "\n".join(lines)

    def state_dict(self) -> dict:
        fired = None if self.fired is None else {unit: counts.cpu() for unit, counts in self.fired.items()}
        return {"fired": fired, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        fired = state["fired"]
        self.fired = {"": fired} if isinstance(fired, Tensor) else fired  # a Tensor: written before sweeps
        self.tokens = state["tokens"]


def _picture(checkpoint: str, unit: str) -> str:
    """The histogram's file name beside checkpoint ``checkpoint`` (its stem), for member ``unit`` ("" for one SAE)."""
    return f"{checkpoint}_{unit}_feature_density.png" if unit else f"{checkpoint}_feature_density.png"


def plot_feature_density(fired: Tensor, tokens: float, path: Path, step: int) -> Path:
    """Histogram of log10 firing frequency; dead latents (never fired in the window) are counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frequency = fired.double() / max(tokens, 1.0)
    dead = int((fired == 0).sum())
    log_freq = torch.where(fired > 0, frequency.clamp_min(1e-300).log10(), torch.tensor(_DEAD_LOG_FREQ))
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(log_freq.numpy(), bins=60, range=(_DEAD_LOG_FREQ - 0.5, 0.0))
    axis.set_xlabel("log10 firing frequency (dead latents at -10)")
    axis.set_ylabel("latents")
    axis.set_title(
        f"step {step}: {dead} dead of {len(fired)} latents ({100 * dead / len(fired):.1f}%), "
        f"window of {int(tokens):,} tokens"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
