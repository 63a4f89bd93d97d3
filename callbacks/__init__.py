"""Schedules and writers that run beside training and prediction."""

from callbacks.elasticsearch_store import ElasticsearchStore
from callbacks.interpretation_writer import InterpretationWriter
from callbacks.latent_stores import SQLiteStore
from callbacks.qa_prediction_writer import QAPredictionWriter
from callbacks.resampling import DeadLatentResampler
from callbacks.sae_checkpoint import SaeCheckpoint
from callbacks.samples_writer import InterpretationSamplesWriter
from callbacks.sensitive_dropout import SensitiveNeuronDropout

__all__ = [
    "DeadLatentResampler",
    "ElasticsearchStore",
    "InterpretationSamplesWriter",
    "InterpretationWriter",
    "QAPredictionWriter",
    "SQLiteStore",
    "SaeCheckpoint",
    "SensitiveNeuronDropout",
]
