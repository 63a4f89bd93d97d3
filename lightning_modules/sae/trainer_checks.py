"""Checks of the Trainer's settings at the start of an SAE fit, for what Lightning accepts without a word."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn


def warn_if_never_validated(trainer: pl.Trainer) -> None:
    """Warn where ``max_steps`` ends the fit before its first validation (``val_check_interval`` in steps): the demo's
    interval of 160 under a shorter ``--trainer.max_steps`` gave a run with no val/ metrics at all, and Lightning
    said nothing."""
    interval, max_steps = trainer.val_check_interval, trainer.max_steps
    if isinstance(interval, int) and 0 < max_steps < interval and trainer.limit_val_batches != 0:
        rank_zero_warn(
            f"trainer.val_check_interval={interval} is more than trainer.max_steps={max_steps}: this fit will never "
            f"validate; set --trainer.val_check_interval {max_steps} or less"
        )
