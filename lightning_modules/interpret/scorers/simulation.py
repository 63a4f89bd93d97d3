"""Simulation score: how well the explanation predicts the latent's activation at every token (OpenAI, "Language
models can explain neurons in language models", 2023; docs/interpret.md, Scorers).

The explainer simulates each held-out record (``task.simulation``: top, quantile and random contexts) from the
explanation alone; the score is the Pearson correlation of the simulated and the true activations over every token
position of those records, position by position (the measured positions: a record leaves out position 0 where the
sampler did; docs/interpret.md, Records and held-out split).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from neurolight.lightning_modules.interpret.prompts import SimulationPrompt
from neurolight.lightning_modules.interpret.scorers.base import VALUES, ScoreField, Scorer
from neurolight.lightning_modules.interpret.simulation import pearson

if TYPE_CHECKING:
    from neurolight.datamodules.interpret.tasks import LatentTask
    from neurolight.lightning_modules.interpret.prompts import PromptBuilder


class SimulationScorer(Scorer):
    name = "simulation"
    fields = (
        ScoreField(
            "score",
            "score",
            "score",
            "Pearson correlation of simulated and true activations over every token of the held-out contexts",
            chance=0.0,
        ),
    )
    records = ("simulation",)
    readout = VALUES

    def prompts(self, builder: PromptBuilder, explanation: str, task: LatentTask) -> list[SimulationPrompt]:
        prefix = builder.simulation_prefix(explanation)
        return [builder.simulation(prefix, record.tokens) for record in task.simulation]

    def score(self, readings: list[Tensor], task: LatentTask) -> dict[str, float]:
        true = [record.activations for record in task.simulation]
        return {"score": pearson(torch.cat(true), torch.cat(readings)) if true else math.nan}
