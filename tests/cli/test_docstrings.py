"""Every init argument of every class a recipe can name is documented, so ``--help`` explains it (jsonargparse
reads the docstrings with docstring_parser, as this test does)."""

from __future__ import annotations

import inspect

import docstring_parser
import pytest

import neurolight.callbacks
import neurolight.datamodules
import neurolight.lightning_modules


def _configurable_classes() -> list[type]:
    """The exported classes a recipe names by ``class_path``: modules, data modules, callbacks, stores, loggers and
    SAE architectures."""
    from lightning.pytorch import Callback, LightningDataModule, LightningModule
    from lightning.pytorch.loggers import Logger

    from neurolight.callbacks.interpret.stores import LatentStore
    from neurolight.lightning_modules.sae.architectures import Architecture

    bases = (LightningModule, LightningDataModule, Callback, LatentStore, Logger, Architecture)
    classes = []
    for package in (neurolight.datamodules, neurolight.lightning_modules, neurolight.callbacks):
        for name in package.__all__:
            value = getattr(package, name)
            if inspect.isclass(value) and issubclass(value, bases):
                classes.append(value)
    return classes


def _documented(cls: type) -> set[str]:
    names = set()
    for doc in (cls.__doc__, cls.__init__.__doc__):
        if doc:
            names |= {param.arg_name for param in docstring_parser.parse(doc).params}
    return names


@pytest.mark.parametrize("cls", _configurable_classes(), ids=lambda cls: cls.__name__)
def test_every_init_argument__has_a_docstring(cls):
    parameters = [
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    missing = sorted(set(parameters) - _documented(cls))
    assert not missing, f"{cls.__name__}: undocumented init arguments {missing}"


def test_the_classes_a_recipe_can_name__are_all_checked():
    names = {cls.__name__ for cls in _configurable_classes()}
    assert {"SparseAutoencoderModule", "SendModule", "QADataModule", "SensitiveNeuronDropout", "SQLiteStore"} <= names
    assert {"TopK", "MatryoshkaBatchTopK", "ResumableCSVLogger"} <= names
