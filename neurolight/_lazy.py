"""Module-level ``__getattr__`` for packages that export names without importing their modules up front (PEP 562):
the tokenizer's worker processes import ``neurolight.datamodules`` and must not pay for importing Lightning."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """``__getattr__`` that imports ``exports[name]`` (a module path) on first access to ``name``."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    return __getattr__
