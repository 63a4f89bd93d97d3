"""Schedules and writers that run beside training."""

from callbacks.qa_prediction_writer import QAPredictionWriter
from callbacks.resampling import DeadLatentResampler
from callbacks.sae_checkpoint import SaeCheckpoint
from callbacks.sensitive_dropout import SensitiveNeuronDropout

__all__ = ["DeadLatentResampler", "QAPredictionWriter", "SaeCheckpoint", "SensitiveNeuronDropout"]
