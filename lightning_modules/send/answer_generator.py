"""AnswerGenerator: one-line answers to QA prompts from any causal LM, optionally with EigenScore per question.

    neurolight predict --config configs/send/generate.yaml
    neurolight predict --config configs/send/generate.yaml \\
        --model.init_args.model_name runs/demo/send/smollm2-135m_fanoutqa_SEND \\
        --data.init_args.model_name runs/demo/send/smollm2-135m_fanoutqa_SEND

The prompts come from ``QADataModule.predict_dataloader`` (exactly the training prompt up to the first answer
token, left padded). Generation stops at the end of the answer line: at EOS, or at the first token holding a
newline once the answer has visible text (blank lines before it are skipped); the answer is that line, stripped.
``neurolight.callbacks.QAPredictionWriter`` scores the answers and writes them.

Hallucination detection (INSIDE, Chen et al., ICLR 2024, section 3.1; docs/send.md, Hallucination detection):
with ``num_generations`` = K >= 2, K more answers are sampled per question (INSIDE: K = 10, temperature 0.5,
top_p 0.99, top_k 10), each embedded as the hidden state of ``embedding_layer`` (default: the middle layer) at its
last answer token, and the question gets the EigenScore of those K embeddings (``answer_eigenscore``, and
``answer_ees`` from the efficient estimator): high = the answers disagree = likely hallucination. Beside it, from
the logits ``generate`` returned and the texts (``detection_scores``; docs/send.md, Baselines): the greedy answer's
``perplexity`` and ``energy``, and the K answers' ``ln_entropy`` and ``lexical_similarity``. With ``judge_model``
a second LM labels each answer correct or not (``judge_p_yes``; ``judge.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor
from transformers import StoppingCriteria, StoppingCriteriaList

from neurolight.datamodules.llm.models import load_causal_lm, load_tokenizer, resolve_model
from neurolight.lightning_modules.send.detection_scores import (
    TokenStatistics,
    lexical_similarity,
    ln_entropy,
    perplexity,
    scored_lengths,
    token_statistics,
)
from neurolight.lightning_modules.send.eigenscore import efficient_eigenscore, eigenscore
from neurolight.lightning_modules.send.eigenscore.score import EES_METHODS


class StopTokens(NamedTuple):
    """Per vocabulary id, what its text means for the end of an answer line; (vocab,) bool tensors."""

    eos: Tensor
    """End-of-sequence tokens (the tokenizer's and the generation config's)."""
    newline: Tensor
    """Tokens whose text holds a newline: "\\n", ".\\n", "\\n\\n", "\\nThe"."""
    text_before_newline: Tensor
    """Tokens with visible text before their first newline (".\\n")."""
    blank: Tensor
    """Tokens whose text is only white space (or empty)."""


def stop_tokens(tokenizer, eos_ids: Iterable[int], vocab_size: int | None = None) -> StopTokens:
    """Classify every token id of ``tokenizer`` (``vocab_size``: the model's, if its embedding has spare rows)."""
    size = max(len(tokenizer), vocab_size or 0)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    texts += ["\ufffd"] * (size - len(texts))  # unused rows of a padded embedding: ordinary text
    eos = torch.zeros(size, dtype=torch.bool)
    eos[[i for i in eos_ids if i is not None and 0 <= i < size]] = True
    return StopTokens(
        eos=eos,
        newline=torch.tensor(["\n" in text for text in texts]),
        text_before_newline=torch.tensor([bool(text.split("\n", 1)[0].strip()) for text in texts]),
        blank=torch.tensor([not text.strip() for text in texts]),
    )


def first_stop(generated: Tensor, stops: StopTokens) -> tuple[Tensor, Tensor]:
    """Where each answer line of ``generated`` (rows, new_tokens), the tokens after the prompt, ends.

    A row ends at its first EOS, or at its first newline token once the answer has visible text (white space and
    empty lines before the answer are skipped: "Answer:\\n Paris\\n" answers "Paris").

    Returns:
        ``position`` (rows,): index of the stop token (``new_tokens`` when none came) and ``stopped`` (rows,) bool.
    """
    flags = [flag.to(generated.device)[generated] for flag in stops]
    eos, newline, text_before_newline, blank = flags
    seen_text = (~blank).long().cumsum(1) - (~blank).long() > 0  # visible text strictly before this token
    is_stop = eos | (newline & (seen_text | text_before_newline))
    stopped = is_stop.any(1)
    position = torch.where(stopped, is_stop.int().argmax(1), generated.shape[1])
    return position, stopped


class AnswerLineStop(StoppingCriteria):
    """Stops generating a row at the end of its answer line (``first_stop``); ``prompt_width`` tokens precede."""

    def __init__(self, stops: StopTokens, prompt_width: int) -> None:
        self.stops, self.prompt_width = stops, prompt_width

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        return first_stop(input_ids[:, self.prompt_width :], self.stops)[1]


class Answers(NamedTuple):
    """Answers cut at their stop token, from ``cut_answers``."""

    texts: list[str]
    """Per row: the first non-empty line of the answer, stripped."""
    num_tokens: Tensor
    """(rows,) answer tokens before the stop token (all generated tokens when no stop token came)."""
    stopped: Tensor
    """(rows,) bool: a stop token (newline or EOS) ended the row, rather than ``max_new_tokens``."""


def cut_answers(generated: Tensor, stops: StopTokens, tokenizer) -> Answers:
    """Cut each row of ``generated`` (rows, new_tokens), the tokens after the prompt, at the end of its answer line.

    The stop token is decoded with the answer and the text cut at its newline, so a token like ".\\n" keeps its
    "."; anything after the stop token (more lines, padding) is ignored.
    """
    position, stopped = first_stop(generated, stops)
    texts = []
    for row, n in enumerate(position.tolist()):
        text = tokenizer.decode(generated[row, : n + 1].tolist(), skip_special_tokens=True)
        texts.append(next((line.strip() for line in text.split("\n") if line.strip()), ""))
    return Answers(texts, position.cpu(), stopped.cpu())


def _position_ids(attention_mask: Tensor) -> Tensor:
    # What generate() uses under left padding; models with absolute positions need it, RoPE is indifferent.
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


class Generation(NamedTuple):
    """What ``AnswerGenerator.generate`` returns."""

    tokens: Tensor
    """(rows, steps) answer token ids after the prompt; rows of one prompt are consecutive."""
    logits: tuple[Tensor, ...]
    """Per step, the raw logits (rows, vocab) that chose that step's token (before temperature and top-k/p)."""
    hidden: tuple[Tensor, ...] | None = None
    """K sampled answers only: per step, the hidden state (rows, d) of layer ``embedding_layer`` at the position fed
    to that step: step 0 the last prompt token, step i answer token i - 1; one step more than ``tokens`` holds."""


class AnswerGenerator(pl.LightningModule):
    def __init__(
        self,
        model_name: str = "smollm2-135m",
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_generations: int = 0,
        hd_temperature: float = 0.5,
        hd_top_p: float = 0.99,
        hd_top_k: int = 10,
        embedding_layer: int | None = None,
        alpha: float = 1e-3,
        ees_method: str = "auto",
        energy_temperature: float = 1.0,
        judge_model: str | None = None,
    ) -> None:
        """
        Args:
            model_name: Model that answers: a short name (``neurolight.datamodules.MODELS``), a Hugging Face id, or a
                local directory such as a SEND run's ``{output_dir}/{model}_{dataset}_SEND``. The data module's
                ``model_name`` must tokenize the same way (pass the same model to both).
            max_new_tokens: Longest answer in tokens; generation stops earlier at a newline or EOS.
            temperature: Sampling temperature of the answer that is scored; 0 = greedy decoding.
            top_p: Nucleus sampling of the scored answer (1.0 = off); used only when ``temperature`` > 0.
            top_k: Top-k sampling of the scored answer (0 = off); used only when ``temperature`` > 0.
            num_generations: K, the answers sampled per question for EigenScore hallucination detection; 0 = off.
                EigenScore measures the spread of K answers, so K must be at least 2 (INSIDE used 10).
            hd_temperature: Temperature of the K sampled answers (INSIDE: 0.5).
            hd_top_p: Nucleus sampling of the K sampled answers (INSIDE: 0.99).
            hd_top_k: Top-k sampling of the K sampled answers (INSIDE: 10; 0 = off).
            embedding_layer: Hidden state that embeds a sampled answer, indexed as Hugging Face's
                ``hidden_states`` (0 = token embeddings, L = the last of L layers); default: L // 2, the middle.
            alpha: Regulariser of EigenScore's log-determinant, log(lambda_i + alpha) (INSIDE: 1e-3).
            ees_method: ``method`` of the efficient EigenScore (``answer_ees``): ``auto`` (the exact score where it is
                cheaper, as it is for K answers of one question), ``slq``, ``kpm`` (the SEND paper's Algorithm 1)
                or ``exact``; docs/send.md, Efficient EigenScore.
            energy_temperature: T of the greedy answer's energy score, the mean of -T logsumexp(logits / T) over
                its tokens (Liu et al. 2020; 1 = the model's own logits).
            judge_model: A causal LM that labels every greedy answer correct or not from P(Yes) of "is this answer
                correct given the gold answers" (short name, Hugging Face id or local directory; ``smollm2-135m``
                runs offline); None: no judge label. docs/send.md, Correctness labels.
        """
        super().__init__()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if temperature < 0 or hd_temperature <= 0:
            raise ValueError(
                f"temperature={temperature} must be >= 0 (0 = greedy) and hd_temperature={hd_temperature} > 0"
            )
        for name, value in (("top_p", top_p), ("hd_top_p", hd_top_p)):
            if not 0 < value <= 1:
                raise ValueError(f"{name}={value} must be in (0, 1]; 1.0 turns nucleus sampling off")
        for name, value in (("top_k", top_k), ("hd_top_k", hd_top_k)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0; 0 turns top-k sampling off")
        if num_generations == 1 or num_generations < 0:
            raise ValueError(
                f"num_generations={num_generations}: EigenScore measures how K sampled answers spread, which "
                "needs K >= 2 (INSIDE used 10); pass num_generations=0 to turn hallucination detection off"
            )
        if alpha <= 0:
            raise ValueError(f"alpha={alpha} must be positive: it keeps log(lambda + alpha) finite")
        if ees_method not in EES_METHODS:
            raise ValueError(f"ees_method='{ees_method}' is unknown; choose one of {', '.join(EES_METHODS)}")
        if energy_temperature <= 0:
            raise ValueError(f"energy_temperature={energy_temperature} must be positive (1 = the raw logits)")
        self.save_hyperparameters()
        self.model = None
        self.tokenizer = None
        self.layer: int | None = None
        self.stops: StopTokens | None = None
        self.eos_ids: list[int] = []
        self.judge = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.model_name)
        # The default dtype is the Trainer's: "bf16-true" / "16-true" precision set it around this hook.
        self.model = load_causal_lm(hp.model_name, dtype=torch.get_default_dtype()).eval()
        self.model.requires_grad_(False)
        num_layers = self.model.config.num_hidden_layers
        self.layer = num_layers // 2 if hp.embedding_layer is None else hp.embedding_layer
        if not 0 <= self.layer <= num_layers:
            raise ValueError(
                f"embedding_layer={hp.embedding_layer} is out of range: {hp.model_name} has {num_layers} layers, "
                f"so hidden states 0 (token embeddings) to {num_layers} (last layer)"
            )
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids = sorted({*eos, self.tokenizer.eos_token_id} - {None})
        self.stops = stop_tokens(self.tokenizer, self.eos_ids, self.model.config.vocab_size)
        if hp.judge_model is not None:
            from neurolight.lightning_modules.send.judge import AnswerJudge

            self.judge = AnswerJudge(hp.judge_model)

    @property
    def model_path(self) -> str:
        """Where the weights came from (the short name resolved to its Hugging Face id or local directory)."""
        return resolve_model(self.hparams.model_name)

    def on_predict_start(self) -> None:
        self.stops = StopTokens(*(flags.to(self.device) for flags in self.stops))  # read at every generated token
        data_tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if data_tokenizer is not None and data_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            data_model = getattr(self.trainer.datamodule.hparams, "model_name", "?")
            raise ValueError(
                f"the data module tokenizes with '{data_model}', whose vocabulary differs from that of "
                f"model_name '{self.hparams.model_name}'; pass the same model as data.model_name"
            )

    # ------------------------------------------------------------------------------------------------ generation
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor, sample: bool, num_return_sequences: int = 1
    ) -> Generation:
        """Answer tokens after the prompt, (batch * num_return_sequences, <= max_new_tokens), with the logits of
        every step; rows of one prompt are consecutive. ``sample`` picks the K-answer settings (hd_*) instead of
        the scored answer's."""
        hp = self.hparams
        extra, new_tokens = {}, hp.max_new_tokens
        if num_return_sequences > 1:
            # Each prompt's prefill once, its KV cache copied for the K rows (generate would run the prompt K times),
            # and the answer embeddings read as the tokens are generated (no second forward over prompt + answer,
            # INSIDE reads them from generate too). One step more than kept: its input is the last kept token,
            # whose hidden state ends an answer that no stop token cut.
            extra["cache"] = self._prompt_cache(input_ids, attention_mask, num_return_sequences)
            input_ids = input_ids.repeat_interleave(num_return_sequences, 0)
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, 0)
            extra["output_hidden_states"], new_tokens, num_return_sequences = True, new_tokens + 1, 1
        if sample:
            settings = {"do_sample": True, "temperature": hp.hd_temperature, "top_p": hp.hd_top_p, "top_k": hp.hd_top_k}
        elif hp.temperature > 0:
            settings = {"do_sample": True, "temperature": hp.temperature, "top_p": hp.top_p, "top_k": hp.top_k}
        else:
            settings = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            eos_token_id=self.eos_ids,
            stopping_criteria=StoppingCriteriaList([AnswerLineStop(self.stops, input_ids.shape[1])]),
            pad_token_id=self.tokenizer.pad_token_id,
            num_return_sequences=num_return_sequences,
            return_dict_in_generate=True,
            output_logits=True,  # raw logits: the baselines score tokens under the model's own distribution
            **settings,
            **extra,
        )
        keep = hp.max_new_tokens
        hidden = None
        if out.hidden_states is not None:
            hidden = tuple(step[self.layer][:, -1].float() for step in out.hidden_states)
        return Generation(out.sequences[:, input_ids.shape[1] :][:, :keep], tuple(out.logits)[:keep], hidden)

    @torch.no_grad()
    def _prompt_cache(self, input_ids: Tensor, attention_mask: Tensor, copies: int):
        """The KV cache of every prompt but its last token (which generate feeds itself), ``copies`` rows a prompt."""
        mask = attention_mask[:, :-1]
        cache = self.model(
            input_ids=input_ids[:, :-1], attention_mask=mask, position_ids=_position_ids(mask), use_cache=True
        ).cache
        cache.batch_repeat_interleave(copies)
        return cache

    def statistics(self, generation: Generation, answers: Answers) -> TokenStatistics:
        """Mean log-probability and energy of each answer's tokens (``detection_scores.token_statistics``)."""
        lengths = scored_lengths(answers.num_tokens, answers.stopped, generation.tokens.shape[1])
        return token_statistics(generation.logits, generation.tokens, lengths, self.hparams.energy_temperature)

    @staticmethod
    def answer_embeddings(hidden: tuple[Tensor, ...], answers: Answers) -> Tensor:
        """(rows, d) float32: hidden state ``self.layer`` at each answer's last token (the position whose output
        ended the answer, as INSIDE reads it from generate; the last prompt token for an empty answer), from
        ``Generation.hidden`` (``hidden``: its steps, for these rows): an answer of n tokens ends at step n's input.
        """
        steps = torch.stack(hidden, 1)  # (rows, steps, d)
        rows = torch.arange(len(steps), device=steps.device)
        return steps[rows, answers.num_tokens.to(steps.device)]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One dict per question: ``question_id``, ``question``, ``reference_answer`` (the training target),
        ``answers`` (every gold answer), ``prompt``, ``generated_response``, its ``perplexity`` and ``energy``,
        TruthfulQA's ``correct_answers`` / ``incorrect_answers`` where the record has them, ``index`` (position in
        the test split); with ``num_generations`` >= 2 also ``sampled_responses`` (K texts), ``answer_eigenscore``,
        ``answer_ees``, ``ln_entropy`` and ``lexical_similarity``; with ``judge_model``, ``judge_p_yes``."""
        input_ids, attention_mask, records = batch["input_ids"], batch["attention_mask"], batch["records"]
        greedy = self.generate(input_ids, attention_mask, sample=False)
        answers = cut_answers(greedy.tokens, self.stops, self.tokenizer)
        statistics = self.statistics(greedy, answers)
        rows = []
        for row, record in enumerate(records):
            prompt = input_ids[row][attention_mask[row].bool()].tolist()
            result = {
                "index": int(batch["index"][row]),
                "question_id": record.id,
                "question": record.question,
                "reference_answer": record.answer,
                "answers": list(record.answers),
                "prompt": self.tokenizer.decode(prompt, skip_special_tokens=False),
                "generated_response": answers.texts[row],
                "perplexity": perplexity(float(statistics.mean_logprob[row])),
                "energy": float(statistics.mean_energy[row]),
            }
            if record.correct_answers and record.incorrect_answers:
                result["correct_answers"] = list(record.correct_answers)
                result["incorrect_answers"] = list(record.incorrect_answers)
            rows.append(result)
        k = self.hparams.num_generations
        if k >= 2:
            for row, scores in enumerate(self.sample_scores(input_ids, attention_mask, k)):
                rows[row] |= scores
        if self.judge is not None:
            gold = [list(record.answers) or [record.answer] for record in records]
            p_yes = self.judge.p_yes([r.question for r in records], gold, answers.texts)
            for row, value in zip(rows, p_yes.tolist()):
                row["judge_p_yes"] = value
        return rows

    def sample_scores(self, input_ids: Tensor, attention_mask: Tensor, k: int) -> Iterable[dict]:
        """Per prompt: its K sampled answer texts (``sampled_responses``) and the scores computed from them,
        ``answer_eigenscore``, ``answer_ees``, ``ln_entropy`` and ``lexical_similarity``."""
        hp = self.hparams
        generation = self.generate(input_ids, attention_mask, sample=True, num_return_sequences=k)
        sampled = cut_answers(generation.tokens, self.stops, self.tokenizer)
        mean_logprob = self.statistics(generation, sampled).mean_logprob
        for row in range(len(input_ids)):
            # One question at a time: its K consecutive rows.
            rows = slice(row * k, (row + 1) * k)
            part = Answers(sampled.texts[rows], sampled.num_tokens[rows], sampled.stopped[rows])
            embeddings = self.answer_embeddings(tuple(step[rows] for step in generation.hidden), part)
            yield {
                "sampled_responses": part.texts,
                "answer_eigenscore": float(eigenscore(embeddings, alpha=hp.alpha)),
                "answer_ees": float(efficient_eigenscore(embeddings, alpha=hp.alpha, seed=0, method=hp.ees_method)),
                "ln_entropy": ln_entropy(mean_logprob[rows].tolist()),
                "lexical_similarity": lexical_similarity(part.texts),
            }
