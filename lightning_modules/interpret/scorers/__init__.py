"""Interpretation scorers, found by name (docs/interpret.md, Scorers): ``LatentInterpreter(scorers=[...])`` runs
them, and the store schema and the feature browser's columns follow from the fields of the ones that ran.

Adding a scorer: one file here with a ``Scorer`` subclass (``base.py`` describes the interface) and one line in
``SCORERS``.
"""

from __future__ import annotations

from collections.abc import Sequence

from neurolight.lightning_modules.interpret.scorers.base import ScoreField, Scorer
from neurolight.lightning_modules.interpret.scorers.detection import DetectionScorer
from neurolight.lightning_modules.interpret.scorers.fuzzing import FuzzingScorer
from neurolight.lightning_modules.interpret.scorers.simulation import SimulationScorer

SCORERS: dict[str, type[Scorer]] = {
    "simulation": SimulationScorer,
    "detection": DetectionScorer,
    "fuzzing": FuzzingScorer,
}
"""Name (as configs list it) -> scorer class."""
DEFAULT_SCORERS = ("simulation", "detection")
"""What ``LatentInterpreter`` runs unless told otherwise."""


def scorer_class(name: str) -> type[Scorer]:
    if name not in SCORERS:
        raise ValueError(f"scorer '{name}' is unknown; choose from {', '.join(SCORERS)}")
    scorer = SCORERS[name]
    if scorer.name != name:
        raise TypeError(f"SCORERS['{name}'] is {scorer.__name__}, whose name is '{scorer.name}'")
    scorer.check()
    return scorer


def build_scorers(names: Sequence[str]) -> list[Scorer]:
    """One scorer per name, in order; unknown or repeated names and two scorers writing one field fail."""
    if isinstance(names, str):
        raise TypeError(f"scorers must be a list of names, e.g. ['{names}'], not the string '{names}'")
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f"scorers {list(names)} name {', '.join(repeated)} more than once")
    scorers = [scorer_class(name)() for name in names]
    score_fields(names)  # fields written twice fail here
    return scorers


def score_fields(names: Sequence[str]) -> list[ScoreField]:
    """The fields that the named scorers write, in order."""
    fields: list[ScoreField] = []
    for name in names:
        for field in scorer_class(name).fields:
            if field.name in {f.name for f in fields} or field.key in {f.key for f in fields}:
                raise ValueError(f"scorers {list(names)} write the field '{field.name}' ('{field.key}') twice")
            fields.append(field)
    return fields


__all__ = [
    "DEFAULT_SCORERS",
    "SCORERS",
    "DetectionScorer",
    "FuzzingScorer",
    "ScoreField",
    "Scorer",
    "SimulationScorer",
    "build_scorers",
    "score_fields",
    "scorer_class",
]
