"""What runs beside training and prediction, one subpackage per pipeline: schedules (sensitive-neuron dropout,
dead-latent resampling), checkpoints, prediction writers and the latent stores they write to."""

from neurolight._lazy import lazy_exports

# Lazy, like the other two folders, so that ``import neurolight`` stays cheap.
_EXPORTS = {
    "DeadLatentResampler": "neurolight.callbacks.sae.resampling",
    "SaeCheckpoint": "neurolight.callbacks.sae.checkpoint",
    "QAPredictionWriter": "neurolight.callbacks.send.qa_prediction_writer",
    "SensitiveNeuronDropout": "neurolight.callbacks.send.sensitive_dropout",
    "InterpretationSamplesWriter": "neurolight.callbacks.interpret.samples_writer",
    "InterpretationWriter": "neurolight.callbacks.interpret.interpretation_writer",
    "ElasticsearchStore": "neurolight.callbacks.interpret.stores",
    "SQLiteStore": "neurolight.callbacks.interpret.stores",
    "ResumableCheckpoint": "neurolight.callbacks.resumable_checkpoint",
    "ResumableCSVLogger": "neurolight.callbacks.resumable_csv_logger",
    "LineProgress": "neurolight.callbacks.line_progress",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
