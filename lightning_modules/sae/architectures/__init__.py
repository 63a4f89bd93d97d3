"""SAE architectures, one file each, found by name through ``ARCHITECTURES``.

A new architecture is one new file with a subclass of ``Architecture`` (``base.py``) plus one line below; it is then
exported from ``neurolight.lightning_modules`` under its class name, so recipes write
``architecture: {class_path: neurolight.lightning_modules.<Class>, init_args: {...}}``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from neurolight.lightning_modules.sae.architectures.base import (
    Architecture,
    ResampleReset,
    remove_parallel_component,
    remove_parallel_component_,
    unit_norm_rows,
    unit_norm_rows_,
)
from neurolight.lightning_modules.sae.architectures.batchtopk import BatchTopK
from neurolight.lightning_modules.sae.architectures.jumprelu import JumpReLU
from neurolight.lightning_modules.sae.architectures.matryoshka import MatryoshkaBatchTopK
from neurolight.lightning_modules.sae.architectures.relu import ReLU
from neurolight.lightning_modules.sae.architectures.topk import TopK

ARCHITECTURES: dict[str, type[Architecture]] = {
    "relu": ReLU,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpReLU,
    "matryoshka_batchtopk": MatryoshkaBatchTopK,
}

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ResampleReset",
    "architecture_class",
    "architecture_config",
    "architecture_name",
    "build_architecture",
    "remove_parallel_component",
    "remove_parallel_component_",
    "unit_norm_rows",
    "unit_norm_rows_",
    *(cls.__name__ for cls in ARCHITECTURES.values()),
]

_EXPORTING_PACKAGE = "neurolight.lightning_modules"


def architecture_class(name: str) -> type[Architecture]:
    """The class of a registered name (``topk``), class name (``TopK``) or class path; an unregistered class path
    is imported, so an architecture defined outside neurolight loads from its checkpoint too."""
    by_class_name = {cls.__name__: cls for cls in ARCHITECTURES.values()}
    short = name.rsplit(".", 1)[-1]
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if short in by_class_name and (name == short or name.startswith("neurolight.")):
        return by_class_name[short]
    if "." in name:
        module, _, attribute = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, Architecture):
            return cls
    valid = ", ".join(f"{key} ({cls.__name__})" for key, cls in ARCHITECTURES.items())
    raise ValueError(f"unknown SAE architecture {name!r}; choose one of {valid}, or a class path of an Architecture")


def architecture_name(architecture: Architecture) -> str:
    """The registered name of an architecture (its class path if it is not registered)."""
    for name, cls in ARCHITECTURES.items():
        if type(architecture) is cls:
            return name
    return f"{type(architecture).__module__}.{type(architecture).__qualname__}"


def architecture_config(architecture: Architecture) -> dict:
    """``{"class_path": ..., "init_args": {...}}``, the form a recipe and a checkpoint's hyperparameters hold."""
    cls = type(architecture)
    registered = cls in ARCHITECTURES.values()
    class_path = f"{_EXPORTING_PACKAGE}.{cls.__name__}" if registered else f"{cls.__module__}.{cls.__qualname__}"
    return {"class_path": class_path, "init_args": architecture.settings()}


def build_architecture(spec: Architecture | str | Mapping) -> Architecture:
    """An architecture from an instance (returned as is), a name with default settings (``"topk"``), or the
    ``{"class_path", "init_args"}`` mapping of a recipe or checkpoint. Settings of another architecture are
    refused with the ones this one takes."""
    if isinstance(spec, Architecture):
        return spec
    if isinstance(spec, str):
        return architecture_class(spec)()
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise TypeError(f"architecture must be an Architecture, a name or a class_path mapping, got {spec!r}")
    cls = architecture_class(spec["class_path"])
    init_args = dict(spec.get("init_args") or {})
    unknown = set(init_args) - set(cls.setting_names())
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no setting {', '.join(sorted(unknown))}; its settings are "
            f"{', '.join(cls.setting_names())}"
        )
    return cls(**init_args)
