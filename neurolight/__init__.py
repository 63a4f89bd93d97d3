"""neurolight: neuron-level work on language models with PyTorch Lightning.

The public API, importable from here (``from neurolight import SparseAutoencoder``); the command line is
``neurolight`` or ``python -m neurolight``. Imports run one way: ``datamodules`` (data, the frozen LLM) <-
``lightning_modules`` <- ``callbacks`` <- ``cli``.
"""

from neurolight._lazy import lazy_exports

# Lazy: ``import neurolight`` stays cheap (the tokenizer's worker processes import a submodule of it).
_EXPORTS = {
    **{
        name: "neurolight.lightning_modules"
        for name in (
            "AnswerGenerator",
            "LatentInterpreter",
            "LatentSampler",
            "RunningLatentSamples",
            "SendModule",
            "SparseAutoencoder",
            "SparseAutoencoderModule",
        )
    },
    **{
        name: "neurolight.datamodules"
        for name in (
            "ActivationDataModule",
            "CorpusContextDataModule",
            "HookedLLM",
            "InterpretationDataModule",
            "InterpretationSamples",
            "MODELS",
            "QADataModule",
            "load_causal_lm",
            "load_tokenizer",
        )
    },
    **{
        name: "neurolight.callbacks"
        for name in (
            "DeadLatentResampler",
            "ElasticsearchStore",
            "InterpretationSamplesWriter",
            "InterpretationWriter",
            "QAPredictionWriter",
            "SQLiteStore",
            "SaeCheckpoint",
            "SensitiveNeuronDropout",
        )
    },
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
