"""The ``neurolight fit`` recipes of a SEND grid pair, composed as LightningCLI composes ``--config`` files.

A pair's recipe is the dataset's ``configs/send/{dataset}.yaml`` (fanoutqa: ``configs/send/demo.yaml``) followed by the
model's overlay ``configs/send/models/{model}.yaml`` where one exists, or ``--fit_config`` as given. What the
composed files set (the callbacks list, the logger) decides the options ``neurolight-send-grid`` adds to the fit
command; see ``neurolight.cli.send_grid``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATASET_RECIPES = {"fanoutqa": "configs/send/demo.yaml"}
"""Fit recipes not named ``configs/send/{dataset}.yaml``: the embedded data set's is the SmolLM2 demo."""
MODEL_OVERLAY = "configs/send/models/{model}.yaml"


def find_config(path: str) -> Path:
    """A recipe path as given, else the same path inside the installed ``configs`` package."""
    given = Path(path).expanduser()
    if given.is_file() or given.is_absolute():
        return given
    from neurolight import configs

    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    packaged = Path(configs.__file__).parent.joinpath(*parts)
    return packaged if packaged.is_file() else given


def fit_configs(args: argparse.Namespace, model: str, dataset: str) -> list[Path]:
    """The ``--config`` files of one pair's fit, in order: ``--fit_config`` as given, else the dataset's recipe and
    the model's overlay where one exists (only short names have one: ``configs/send/models/llama2-7b.yaml``)."""
    if args.fit_config:
        return [find_config(path) for path in args.fit_config]
    recipe = find_config(DATASET_RECIPES.get(dataset, f"configs/send/{dataset}.yaml"))
    if not recipe.is_file():
        shipped = find_config("configs/send/demo.yaml").parent.glob("*.yaml")
        known = sorted({*DATASET_RECIPES, *(path.stem for path in shipped)} - {"demo", "generate"})
        raise SystemExit(
            f"neurolight-send-grid: no SEND recipe for dataset '{dataset}' ({recipe} does not exist); choose one of "
            f"{', '.join(known)} or pass --fit_config RECIPE"
        )
    overlay = find_config(MODEL_OVERLAY.format(model=model))
    return [recipe, overlay] if "/" not in model and overlay.is_file() else [recipe]


def sensitivity_callbacks(configs: list[Path], threshold: float) -> str:
    """The fit recipes' callbacks list with ``sensitivity_threshold`` set, as the value of ``--trainer.callbacks``.

    On the command line ``--trainer.callbacks.init_args.X`` only reaches the LAST callback of the list; replacing
    the whole list sets the SEND callback wherever the recipe put it. A later file's list replaces an earlier one,
    as in LightningCLI, so the list is the last file's that has one.
    """
    callbacks = _trainer_setting(configs, "callbacks") or []
    found = False
    for callback in callbacks:
        init_args = callback.get("init_args") if isinstance(callback, dict) else None
        if isinstance(init_args, dict) and "sensitivity_threshold" in init_args:
            init_args["sensitivity_threshold"] = threshold
            found = True
    if not found:
        raise SystemExit(
            f"--sensitivity_threshold: {' + '.join(map(str, configs))} has no callback with "
            "init_args.sensitivity_threshold (neurolight.callbacks.SensitiveNeuronDropout); "
            "add it there or drop the option"
        )
    return json.dumps(callbacks, separators=(",", ":"))


def plain_callbacks(configs: list[Path]) -> str:
    """The fit recipes' callbacks list without ``SensitiveNeuronDropout``, as the value of ``--trainer.callbacks``:
    the plain fine-tuning control, trained by the same recipe, seed and data."""
    callbacks = _trainer_setting(configs, "callbacks") or []
    kept = [c for c in callbacks if not str((c or {}).get("class_path", "")).endswith("SensitiveNeuronDropout")]
    if len(kept) == len(callbacks):
        raise SystemExit(
            f"--arms plain: {' + '.join(map(str, configs))} has no SensitiveNeuronDropout callback to leave out, so "
            "the control would be the SEND run itself; add it to the recipe or drop 'plain' from --arms"
        )
    return json.dumps(kept, separators=(",", ":"))


def _recipe(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def _trainer_setting(configs: list[Path], key: str):
    """``trainer.<key>`` as the composed ``configs`` set it: the last file's value, except that a class with the same
    ``class_path`` as before keeps the earlier ``init_args`` it does not override (jsonargparse's merge)."""
    value = None
    for path in configs:
        trainer = _recipe(path).get("trainer") or {}
        if key not in trainer:
            continue
        new = trainer[key]
        if isinstance(value, dict) and isinstance(new, dict) and new.get("class_path") == value.get("class_path"):
            new = {**value, **new, "init_args": {**(value.get("init_args") or {}), **(new.get("init_args") or {})}}
        value = new
    return value


def logger_args(configs: list[Path]) -> dict:
    """``init_args`` of the composed recipes' logger when it is one class (not false, not a list)."""
    logger = _trainer_setting(configs, "logger")
    return (logger.get("init_args") or {}) if isinstance(logger, dict) else {}
