"""AnswerJudge: a correctness label from any causal LM, read from its Yes/No probabilities.

The judge is asked whether an answer is correct given the gold answers and replies after "Answer:"; P(Yes) is
P(" Yes") / (P(" Yes") + P(" No")) of its next token, exactly as the interpretation pipeline's Yes/No scorers read
their explainer (the shared prompt builder and logit reader of ``lightning_modules/interpret``). The label is
"correct" when P(Yes) >= 1/2. docs/send.md, Correctness labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from neurolight.datamodules.llm.models import load_causal_lm, load_tokenizer
from neurolight.lightning_modules.interpret.prompts import PromptBuilder, answer_token
from neurolight.lightning_modules.interpret.scorers.base import yes_no_prompt
from neurolight.lightning_modules.interpret.simulation import yes_probabilities

JUDGE_SYSTEM = (
    "You grade answers to questions. Compare the proposed answer with the gold answers and reply Yes if it is "
    "correct, No if it is not."
)


def judge_question(question: str, gold_answers: Sequence[str], answer: str) -> str:
    """The user turn the judge answers Yes or No to."""
    gold = "; ".join(gold_answers)
    return (
        f"Question: {question}\nGold answers: {gold}\nProposed answer: {answer or '(no answer)'}\n"
        "Is this answer correct given the gold answers: Yes or No?"
    )


class AnswerJudge(nn.Module):
    """A frozen causal LM that labels answers; an ``nn.Module`` so that it moves with the LightningModule."""

    def __init__(self, model_name: str, batch_size: int = 8) -> None:
        super().__init__()
        self.model_name, self.batch_size = model_name, batch_size
        self.tokenizer = load_tokenizer(model_name)
        self.prompts = PromptBuilder(self.tokenizer, max_value=1)
        probe = yes_no_prompt(self.prompts, JUDGE_SYSTEM, judge_question("Is water wet?", ["yes"], "yes"))
        self.yes_id = answer_token(self.tokenizer, probe, "Yes")
        self.no_id = answer_token(self.tokenizer, probe, "No")
        if self.yes_id == self.no_id:
            raise ValueError(
                f"the judge '{model_name}' tokenizes ' Yes' and ' No' with the same first token (id {self.yes_id}), "
                "so it cannot answer; pick another judge_model"
            )
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.model = load_causal_lm(model_name, dtype=torch.get_default_dtype()).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def p_yes(self, questions: Sequence[str], gold: Sequence[Sequence[str]], answers: Sequence[str]) -> Tensor:
        """(N,) float32 P(Yes) that each answer is correct."""
        prompts = [
            yes_no_prompt(self.prompts, JUDGE_SYSTEM, judge_question(q, g, a))
            for q, g, a in zip(questions, gold, answers)
        ]
        return yes_probabilities(self.model, prompts, self.yes_id, self.no_id, self.pad_id, self.batch_size)[0]
