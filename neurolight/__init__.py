"""neurolight: neuron-level work on language models with PyTorch Lightning.

The public API, importable from here (``from neurolight import SparseAutoencoder``): the LightningModules, the data
modules, the callbacks, the SAE and the model loaders. Everything else stays under its package
(``neurolight.lightning_modules.TopK``), which is also how recipes name classes. The command line is ``neurolight``
or ``python -m neurolight``. Imports run one way: ``datamodules`` (data, the frozen LLM) <- ``lightning_modules`` <-
``callbacks`` <- ``cli``.
"""

# Registers the process group's teardown at exit in every process that imports neurolight (a spawned DDP rank).
from neurolight import (
    _process_exit,  # noqa: F401
    callbacks,
)
from neurolight._lazy import lazy_exports

_PUBLIC = {
    "neurolight.lightning_modules": (
        "AnswerGenerator",
        "LatentInterpreter",
        "LatentSampler",
        "RunningLatentSamples",
        "SaeEvaluator",
        "SendModule",
        "SparseAutoencoder",
        "SparseAutoencoderModule",
        "SparseAutoencoderSweep",
    ),
    "neurolight.datamodules": (
        "ActivationDataModule",
        "CorpusContextDataModule",
        "HookedLLM",
        "InterpretationDataModule",
        "InterpretationSamples",
        "MODELS",
        "QADataModule",
        "load_causal_lm",
        "load_tokenizer",
    ),
    "neurolight.callbacks": tuple(callbacks.__all__),
}

# Lazy, like the three packages: ``import neurolight`` stays cheap and a name is imported on first use.
_EXPORTS = {name: package for package, names in _PUBLIC.items() for name in names}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
