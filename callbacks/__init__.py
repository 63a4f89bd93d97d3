"""Schedules and writers that run beside training."""

from callbacks.resampling import DeadLatentResampler
from callbacks.sae_checkpoint import SaeCheckpoint

__all__ = ["DeadLatentResampler", "SaeCheckpoint"]
