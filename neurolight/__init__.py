"""neurolight: neuron-level work on language models with PyTorch Lightning.

The public API, importable from here (``from neurolight import SparseAutoencoder``): every export of
``neurolight.datamodules``, ``neurolight.lightning_modules`` and ``neurolight.callbacks``. The command line is
``neurolight`` or ``python -m neurolight``. Imports run one way: ``datamodules`` (data, the frozen LLM) <-
``lightning_modules`` <- ``callbacks`` <- ``cli``.
"""

from neurolight import callbacks, datamodules, lightning_modules
from neurolight._lazy import lazy_exports

# The three packages export lazily, so ``import neurolight`` stays cheap (the tokenizer's worker processes import a
# submodule of it) and a name is imported on first use.
_EXPORTS = {
    name: package.__name__ for package in (datamodules, lightning_modules, callbacks) for name in package.__all__
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
