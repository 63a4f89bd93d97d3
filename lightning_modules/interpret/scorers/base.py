"""The interface of an interpretation scorer (docs/interpret.md, Scorers).

A scorer says four things, and the rest of the pipeline follows from them:

- ``fields``: the numbers it writes into a latent's store document, with their store types. The store schema (the
  SQLite columns, the Elasticsearch mapping) and the feature browser's columns and sort keys are built from the
  fields of the scorers that ran.
- ``records``: the ``LatentTask`` attributes it reads, which ``InterpretationDataModule`` prepares
  (``num_<records>_samples``).
- ``prompts``: its prompts for one latent, token ids built with the explainer's ``PromptBuilder``.
- ``score``: how the explainer's probabilities at those prompts (its ``readout``) become the score.

The interpreter owns the forward passes: it runs every scorer's prompts through the explainer in batches (the
prompt that a latent's prompts share runs once) and hands back one of two readouts:

- ``"values"``: per prompt (a ``SimulationPrompt``), the expected activation (T,) at every record token, from the
  renormalised probabilities of the value tokens "0", "1", ... (OpenAI's all-at-once simulator);
- ``"yes_no"``: per prompt, P(Yes) / (P(Yes) + P(No)) of the reply's first token; prompts end with
  ``ANSWER_START``, so that the answer's first token is " Yes" or " No" for every Yes/No scorer.

A new scorer is one file with a subclass (``YesNoScorer`` for a Yes/No judgement) and one line in the registry
(``neurolight.lightning_modules.interpret.scorers.SCORERS``).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import Tensor

from neurolight.lightning_modules.interpret.simulation import auroc, balanced_accuracy

if TYPE_CHECKING:
    from neurolight.datamodules.interpret.tasks import LatentTask
    from neurolight.lightning_modules.interpret.prompts import PromptBuilder

VALUES = "values"
YES_NO = "yes_no"
READOUTS = (VALUES, YES_NO)
"""What the interpreter reads from the explainer at a scorer's prompts."""
ANSWER_START = "Answer:"
"""Every Yes/No prompt ends here: the explainer's next token is its answer."""
_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")


class ScoreField(NamedTuple):
    """One number that a scorer writes into a latent's store document."""

    name: str
    """Document field and SQLite column, e.g. ``detection_score``."""
    key: str
    """Short name: the feature browser's sort key (``#sort=detection``) and the label of the latent's stat."""
    title: str
    """What the sort menu and the summaries call it, e.g. ``detection score``."""
    legend: str
    """What it measures, in one line of the feature browser's legend."""
    type: str = "float"
    """Store type, as Elasticsearch names it (``float``, ``double``, ``integer``, ``keyword``)."""
    chance: float | None = None
    """The score of an explanation that says nothing (a coin flip's balanced accuracy 0.5, no correlation 0),
    printed beside the means so that a weak explainer's results read as what they are."""


class Scorer(ABC):
    """Scores one latent's explanation from the explainer's probabilities at the scorer's prompts."""

    name: ClassVar[str]
    """Registry name, as configs list it (``scorers: [simulation, fuzzing]``)."""
    fields: ClassVar[tuple[ScoreField, ...]]
    """What it writes into the document; ``score`` returns a value for each."""
    records: ClassVar[tuple[str, ...]]
    """``LatentTask`` attributes it reads (``InterpretationDataModule`` fills ``x`` when ``num_x_samples`` > 0)."""
    readout: ClassVar[str]
    """``"values"`` or ``"yes_no"``: what the interpreter reads at its prompts (module docstring)."""

    @abstractmethod
    def prompts(self, builder: PromptBuilder, explanation: str, task: LatentTask) -> list:
        """The prompts of one latent: ``SimulationPrompt``s for ``"values"``, token id lists for ``"yes_no"``."""

    @abstractmethod
    def score(self, readings: list[Tensor] | Tensor, task: LatentTask) -> dict[str, float]:
        """Field name -> value (NaN when it cannot be computed) from the readout of ``prompts``, in their order:
        a list of (T,) expected values for ``"values"``, an (N,) tensor of P(Yes) for ``"yes_no"``."""

    @classmethod
    def check(cls) -> None:
        """Raises ``TypeError`` when the class does not declare a usable interface (run by the registry)."""
        if cls.readout not in READOUTS:
            raise TypeError(f"scorer {cls.__name__}: readout '{cls.readout}' is none of {', '.join(READOUTS)}")
        if not cls.fields or not cls.records:
            raise TypeError(f"scorer {cls.__name__} declares no fields or no records")
        for field in cls.fields:
            if not _IDENTIFIER.match(field.name) or not _IDENTIFIER.match(field.key):
                raise TypeError(
                    f"scorer {cls.__name__}: field '{field.name}' (key '{field.key}') must be lower-case letters, "
                    "digits and underscores, starting with a letter (it is a SQLite column and a URL key)"
                )


def yes_no_prompt(builder: PromptBuilder, system: str, question: str) -> list[int]:
    """A one-turn conversation whose reply starts with ``ANSWER_START``: the next token is the answer."""
    return builder.prefix(system, [], question, reply_start=ANSWER_START)


class YesNoScorer(Scorer):
    """A classification score: per item (a text, true or false for the latent), the explainer answers Yes or No;
    the scores are the balanced accuracy of P(Yes) > 1/2 against the items' labels and the AUROC of P(Yes), which
    needs no threshold (delphi's detection and fuzzing, "Automatically interpreting millions of features in LLMs",
    Paulo et al. 2024; docs/interpret.md, Detection). ``fields`` are these two, in this order."""

    readout = YES_NO
    system: ClassVar[str]
    """The conversation's system message: what the explainer judges."""

    @abstractmethod
    def question(self, explanation: str, text: str) -> str:
        """The user's turn for one item. End with the item's text, wrapped in ``literal()``: the prompts of a
        latent then share everything before it, which runs once."""

    @abstractmethod
    def texts(self, task: LatentTask) -> list[str]:
        """The items shown, one prompt each."""

    @abstractmethod
    def labels(self, task: LatentTask) -> Sequence[bool]:
        """Per item of ``texts``: True when the right answer is Yes."""

    def prompts(self, builder: PromptBuilder, explanation: str, task: LatentTask) -> list[list[int]]:
        return [yes_no_prompt(builder, self.system, self.question(explanation, text)) for text in self.texts(task)]

    @staticmethod
    def yes_no_fields(name: str, key: str, items: str, chance: float = 0.5) -> tuple[ScoreField, ScoreField]:
        """The two fields of a Yes/No scorer judging ``items``: ``<name>_score`` (balanced accuracy, sort key
        ``key``) and ``<name>_auroc`` (sort key ``<key>_auroc``)."""
        return (
            ScoreField(f"{name}_score", key, f"{name} score", f"balanced accuracy of telling {items}", chance=chance),
            ScoreField(
                f"{name}_auroc", f"{key}_auroc", f"{name} AUROC", f"AUROC of P(Yes) for telling {items}", chance=chance
            ),
        )

    def score(self, readings: Tensor, task: LatentTask) -> dict[str, float]:
        labels = torch.tensor(list(self.labels(task)), dtype=torch.bool)
        accuracy, area = self.fields
        return {accuracy.name: balanced_accuracy(readings > 0.5, labels), area.name: auroc(readings, labels)}
