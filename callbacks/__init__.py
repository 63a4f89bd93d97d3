"""What runs beside training and prediction, one subpackage per pipeline: schedules (sensitive-neuron dropout,
dead-latent resampling), checkpoint images, prediction writers and the latent stores they write to."""

from neurolight.callbacks.interpret.interpretation_writer import InterpretationWriter
from neurolight.callbacks.interpret.samples_writer import InterpretationSamplesWriter
from neurolight.callbacks.interpret.stores import ElasticsearchStore, SQLiteStore
from neurolight.callbacks.sae.checkpoint import SaeCheckpoint
from neurolight.callbacks.sae.resampling import DeadLatentResampler
from neurolight.callbacks.send.qa_prediction_writer import QAPredictionWriter
from neurolight.callbacks.send.sensitive_dropout import SensitiveNeuronDropout

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
