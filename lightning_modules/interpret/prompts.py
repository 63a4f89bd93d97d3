"""Prompts of the explain and simulate steps, tokenized so that every value slot's position is known; the
conversation prefix that every prompt starts with. The Yes/No scorers' questions are in ``scorers/``.

The formats follow OpenAI's "Language models can explain neurons in language models" (docs/interpret.md): records
are shown as ``token<TAB>activation`` lines between ``<start>`` and ``<end>``, the explanation completes "the main
thing this neuron does is find", and the all-at-once simulation shows a demonstration, then the record with
``unknown`` in every value slot, so ONE forward pass yields the model's value distribution at every token.

A prompt is a conversation prefix (the chat template when the tokenizer has one, plain text otherwise) followed by
a body tokenized separately with ``split_special_tokens``: text such as ``<|im_end|>`` inside a record stays text
and cannot end the conversation. Token strings are escaped (``\\n``, ``\\t``, ``\\r``, ``\\\\``) so that every
record token occupies exactly one line; positions come from the tokenizer's character offsets, never from counting
lines in generated text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from neurolight.datamodules.interpret.tasks import TokenRecord

UNKNOWN = "unknown"
"""What fills a value slot of the record being simulated (OpenAI's all-at-once simulator)."""
_LITERAL = "\x00"  # never in a chat template, and escape_token / literal remove it from record text
EXPLANATION_PREFIX = "the main thing this neuron does is find"
"""The explainer completes this sentence; its continuation, cleaned to one line, is the explanation."""

EXPLAIN_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short document. "
    "Look at the parts of the document the neuron activates for and summarize in a single sentence what the neuron "
    "is looking for. Don't list examples of words.\n\n"
    "The activation format is token<tab>activation. Activation values range from 0 to 10. A neuron finding what "
    "it's looking for is represented by a non-zero activation value. The higher the activation value, the stronger "
    "the match."
)
SIMULATE_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short document. "
    "Look at an explanation of what the neuron does, and try to predict its activations on each token.\n\n"
    'The activation format is token<tab>activation, activations go from 0 to {max_value}, "unknown" indicates an '
    "unknown activation. Most activations will be 0."
)

# The hand-written demonstration of the simulation prompt (it teaches the format of the value slots).
EXAMPLE_TOKENS = ("The", " dog", " chased", " the", " cat", " up", " the", " tree", ",", " then", " a", " bird", ".")
EXAMPLE_VALUES = (0, 10, 0, 0, 8, 0, 0, 1, 0, 0, 0, 7, 0)
EXAMPLE_EXPLANATION = "animals, such as dogs, cats and birds"


class SimulationPrompt(NamedTuple):
    input_ids: list[int]
    """Conversation prefix + record body."""
    read_positions: list[int]
    """(T,) for record token j, the index of the token (its line's TAB) whose next-token distribution is the
    model's guess for j's value."""
    prefix_length: int
    """Length of the conversation prefix (``input_ids[:prefix_length]``), which the records of a latent share."""
    tokens: list[str]
    """(T,) the record's tokens (the generate-and-parse simulator aligns its lines to them)."""


def escape_token(text: str) -> str:
    """One record token as one line's token column: line breaks, tabs, NULs and backslashes escaped."""
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return escaped.replace(_LITERAL, "\\0")


def literal(text: str) -> str:
    """Marks record text inside a prompt message: tokenized with ``split_special_tokens``, so that a string such as
    ``<|im_end|>`` in a record stays text and cannot end the conversation."""
    return _LITERAL + text.replace(_LITERAL, "") + _LITERAL


def value_lines(tokens: Sequence[str], values: Sequence[int | str]) -> str:
    return "".join(f"{escape_token(token)}\t{value}\n" for token, value in zip(tokens, values, strict=True))


def clean_explanation(text: str) -> str:
    """The first sentence of the first non-empty line of the explainer's continuation, without quotes and the
    final period (the prompt asks for one sentence; small explainers ramble on)."""
    line = next((line.strip() for line in text.split("\n") if line.strip()), "")
    line = line.split("<end>")[0].split(". ")[0].strip().strip("\"'`").strip()
    return line[:-1].rstrip() if line.endswith(".") else line


class PromptBuilder:
    """Builds token ids of the explanation and simulation prompts, and the conversation prefix of any prompt, for
    one tokenizer (a fast one: positions come from its offsets)."""

    def __init__(self, tokenizer, max_value: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"the explainer's tokenizer {type(tokenizer).__name__} is a slow (Python) tokenizer; the simulator "
                "needs character offsets, which only fast tokenizers give: save the model with a tokenizer.json"
            )
        self.tokenizer = tokenizer
        self.max_value = max_value
        self.chat = getattr(tokenizer, "chat_template", None) is not None

    # ------------------------------------------------------------------------------------------------- encoding
    def prefix(self, system: str, turns: Sequence[tuple[str, str]], user: str, reply_start: str = "") -> list[int]:
        """Token ids of a conversation up to the assistant's next reply (which starts with ``reply_start``):
        ``turns`` are earlier (user, assistant) pairs, i.e. the few-shot demonstrations. Parts of ``user`` wrapped
        by ``literal`` are tokenized as plain text."""
        if self.chat:
            messages = [{"role": "system", "content": system}]
            for question, answer in turns:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": user})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self._encode(text + reply_start, add_special_tokens=False)
        text = system + "\n\n" + "".join(f"{q}\n{a}\n\n" for q, a in turns) + f"{user}\n{reply_start}"
        return self._encode(text, add_special_tokens=True)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        parts = text.split(_LITERAL)
        if len(parts) % 2 == 0:
            raise ValueError("a literal() marker is unbalanced in a prompt: the chat template dropped or added one")
        ids: list[int] = []
        for i, part in enumerate(parts):
            if part:
                # Odd parts are record text: special-token strings in them stay text.
                encoded = self.tokenizer(
                    part, add_special_tokens=add_special_tokens and not ids, split_special_tokens=i % 2 == 1
                )
                ids += encoded["input_ids"]
        return ids

    def body(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of text appended to a prefix; special-token text stays text."""
        encoded = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        return encoded["input_ids"], [tuple(span) for span in encoded["offset_mapping"]]

    # ---------------------------------------------------------------------------------------------- explanation
    def explanation(self, records: Sequence[TokenRecord], values: Sequence[Sequence[int]]) -> list[int]:
        """The explanation prompt over ``records`` with their 0-10 ``values``, ending where the explainer continues
        "the main thing this neuron does is find".

        Zero-shot: with a demonstration turn, SmolLM2-135M answered every latent with the demonstration's
        explanation verbatim. Instead, the strongest tokens are listed after the records (OpenAI repeats the
        non-zero activations in the same way).
        """
        shown = "".join(
            "<start>\n" + literal(value_lines(record.tokens, record_values)) + "<end>\n"
            for record, record_values in zip(records, values, strict=True)
        )
        strongest: dict[str, int] = {}
        for record, record_values in zip(records, values, strict=True):
            for token, value in zip(record.tokens, record_values, strict=True):
                if value >= 5 and token.strip():
                    strongest[token.strip()] = max(strongest.get(token.strip(), 0), value)
        top = sorted(strongest, key=lambda token: -strongest[token])[:10]
        summary = ", ".join(f'"{escape_token(token)}"' for token in top)
        return self.prefix(
            EXPLAIN_SYSTEM,
            [],
            f"Activations:\n{shown}\nTokens with the highest activations: {literal(summary)}",
            reply_start=EXPLANATION_PREFIX,
        )

    # ----------------------------------------------------------------------------------------------- simulation
    def simulation_prefix(self, explanation: str) -> list[int]:
        """The simulation conversation up to the first ``<start>`` of the record being simulated."""
        scaled = [min(v, self.max_value) for v in EXAMPLE_VALUES]
        demo = "Activations:\n<start>\n" + value_lines(EXAMPLE_TOKENS, scaled) + "<end>"
        return self.prefix(
            SIMULATE_SYSTEM.format(max_value=self.max_value),
            [(f"Neuron 1\nExplanation of neuron 1 behavior: {EXPLANATION_PREFIX} {EXAMPLE_EXPLANATION}.", demo)],
            f"Neuron 2\nExplanation of neuron 2 behavior: {EXPLANATION_PREFIX} {literal(explanation)}.",
            reply_start="Activations:\n",
        )

    def simulation(self, prefix: list[int], tokens: Sequence[str]) -> SimulationPrompt:
        """``prefix`` (from ``simulation_prefix``) + the record with ``unknown`` in every value slot."""
        text, tabs = "<start>\n", []
        for token in tokens:
            text += escape_token(token)
            tabs.append(len(text))
            text += f"\t{UNKNOWN}\n"
        ids, offsets = self.body(text)
        ending_at = {end: i for i, (start, end) in enumerate(offsets) if end > start}
        read = []
        for j, tab in enumerate(tabs):
            i = ending_at.get(tab + 1)
            if i is None or offsets[i][0] > tab:
                raise ValueError(
                    f"the explainer's tokenizer merges the TAB after record token {j} ({tokens[j]!r}) with the "
                    "value slot, so no token ends at the slot; simulate with a tokenizer that keeps '\\t' apart"
                )
            read.append(len(prefix) + i)
        return SimulationPrompt(prefix + ids, read, len(prefix), list(tokens))

    def generation_start(self, prefix: list[int]) -> list[int]:
        """For the generate-and-parse simulator: ``prefix`` + ``<start>``; the model writes the lines itself."""
        return prefix + self.body("<start>\n")[0]


def single_token_values(tokenizer, max_value: int = 10) -> list[int]:
    """Token ids of the values "0", "1", ... as they appear after a TAB, up to the first value that is not one
    token (Llama and SmolLM2 tokenizers split "10" into "1" "0", so there the scale ends at 9)."""
    ids = []
    for value in range(max_value + 1):
        text = f"x\t{value}\n"
        encoded = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        span = (2, 2 + len(str(value)))
        covering = [i for i, (s, e) in enumerate(encoded["offset_mapping"]) if s < span[1] and e > span[0]]
        if len(covering) != 1 or tuple(encoded["offset_mapping"][covering[0]]) != span:
            break
        ids.append(encoded["input_ids"][covering[0]])
    if len(ids) < 2 or len(set(ids)) != len(ids):
        raise ValueError(
            f"the explainer's tokenizer does not write the activation values 0 and 1 as separate single tokens "
            f"after a TAB (found {ids}); the logit-based simulator needs them: pick another explainer_model"
        )
    return ids


def answer_token(tokenizer, prefix: list[int], answer: str) -> int:
    """Id of the token that holds the first character of ``answer`` when " answer" follows ``prefix``."""
    prefix_text = tokenizer.decode(prefix)
    encoded = tokenizer(prefix_text + " " + answer, add_special_tokens=False, return_offsets_mapping=True)
    first = len(prefix_text) + 1
    return next(i for i, (s, e) in zip(encoded["input_ids"], encoded["offset_mapping"]) if s <= first < e)
