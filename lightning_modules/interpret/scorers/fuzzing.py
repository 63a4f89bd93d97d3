"""Fuzzing score: does the explanation tell which tokens of an activating context the latent fires on?
(delphi, "Automatically interpreting millions of features in LLMs", Paulo et al. 2024; docs/interpret.md, Scorers.)

Detection asks whether a context is about the explanation; fuzzing asks it at the level of tokens. Each held-out
activating context of ``task.fuzzing`` is shown twice: once with the tokens where the latent fires marked as
``<<token>>``, once with as many tokens where it does not fire marked instead (the data module draws the marks:
``neurolight.datamodules.interpret.tasks.fuzzing_marks``). Both versions carry the same text, so only the marks
tell them apart. The explainer answers whether the marked tokens are what the explanation describes; as with
simulation, the judgement is read from its probabilities, never parsed from generated text. The scores are the
balanced accuracy of P(Yes) > P(No) over correctly and wrongly marked contexts (``fuzzing_score``) and the AUROC of
P(Yes) (``fuzzing_auroc``): 1 for a perfect judge of a perfect explanation, 0.5 for chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from neurolight.lightning_modules.interpret.prompts import EXPLANATION_PREFIX, literal
from neurolight.lightning_modules.interpret.scorers.base import YesNoScorer

if TYPE_CHECKING:
    from neurolight.datamodules.interpret.tasks import LatentTask

OPEN, CLOSE = "<<", ">>"


def _plain(text: str) -> str:
    """Context text in which the marks cannot appear (``<<`` and ``>>`` are common in code)."""
    return text.replace(OPEN, "< <").replace(CLOSE, "> >")


def marked_text(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The context with every run of marked tokens between ``<<`` and ``>>``; a run's leading white space stays
    outside the marks (``the <<cat>> sat``, not ``the<< cat>> sat``)."""
    if len(tokens) != len(marked):
        raise ValueError(f"{len(tokens)} tokens but {len(marked)} marks")
    runs: list[tuple[bool, str]] = []
    for token, mark in zip(tokens, marked):
        if runs and runs[-1][0] == mark:
            runs[-1] = (mark, runs[-1][1] + token)
        else:
            runs.append((mark, token))
    text = ""
    for mark, run in runs:
        if mark:
            body = run.lstrip()
            text += _plain(run[: len(run) - len(body)]) + OPEN + _plain(body) + CLOSE
        else:
            text += _plain(run)
    return text


class FuzzingScorer(YesNoScorer):
    name = "fuzzing"
    fields = YesNoScorer.yes_no_fields(
        "fuzzing", "fuzzing", "correctly from wrongly marked tokens in activating contexts"
    )
    records = ("fuzzing",)
    system = (
        "We're studying neurons in a neural network. A neuron is described by an explanation of what it looks for. "
        f"In a short text some tokens are marked as {OPEN}token{CLOSE}. Answer Yes if the marked tokens are what "
        "the neuron looks for, No otherwise."
    )

    def question(self, explanation: str, text: str) -> str:
        return (
            f"Explanation: {EXPLANATION_PREFIX} {literal(explanation)}.\n\n"
            f"Are the tokens marked as {OPEN}token{CLOSE} in the following text what the neuron looks for? Answer "
            f"Yes or No.\n\nText: {literal(text)}"
        )

    def texts(self, task: LatentTask) -> list[str]:
        return [marked_text(item.record.tokens, item.marked) for item in task.fuzzing]

    def labels(self, task: LatentTask) -> Sequence[bool]:
        return [item.correct for item in task.fuzzing]
