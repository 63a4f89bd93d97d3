"""Detection score: can the explainer tell, from the explanation, contexts where the latent fires from contexts
where it never does? (delphi, "Automatically interpreting millions of features in LLMs", Paulo et al. 2024;
docs/interpret.md, Scorers.)

Per context of ``task.detection`` (held-out activating contexts, then as many where the latent never fires) the
explainer answers whether the text contains what the explanation describes; the scores are the balanced accuracy of
P(Yes) > 1/2 (``detection_score``) and the AUROC of P(Yes) (``detection_auroc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from neurolight.lightning_modules.interpret.prompts import EXPLANATION_PREFIX, literal
from neurolight.lightning_modules.interpret.scorers.base import YesNoScorer

if TYPE_CHECKING:
    from neurolight.datamodules.interpret.tasks import LatentTask


class DetectionScorer(YesNoScorer):
    name = "detection"
    fields = YesNoScorer.yes_no_fields("detection", "detection", "activating from non-activating contexts")
    records = ("detection",)
    system = (
        "We're studying neurons in a neural network. A neuron is described by an explanation of what it looks for. "
        "Read a short text and answer Yes if the text contains what the neuron looks for, No otherwise."
    )

    def question(self, explanation: str, text: str) -> str:
        return (
            f"Explanation: {EXPLANATION_PREFIX} {literal(explanation)}.\n\n"
            f"Does the following text contain what the neuron looks for? Answer Yes or No.\n\nText: {literal(text)}"
        )

    def texts(self, task: LatentTask) -> list[str]:
        return ["".join(record.tokens) for record in task.detection]

    def labels(self, task: LatentTask) -> Sequence[bool]:
        return task.detection_labels
