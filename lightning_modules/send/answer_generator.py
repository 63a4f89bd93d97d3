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
``answer_ees`` from the efficient estimator): high = the answers disagree = likely hallucination. The greedy and
the K sampled answers of a batch come from one decoding loop (``decode.py``). Beside EigenScore, from the scores
that loop keeps of each step's logits and the texts (``detection_scores``; docs/send.md, Baselines): the greedy answer's
``perplexity`` and ``energy``, and the K answers' ``ln_entropy`` and ``lexical_similarity``. With ``judge_model``
a second LM labels each answer correct or not (``judge_p_yes``; ``judge.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from torch import Tensor

from neurolight.datamodules.llm.models import load_causal_lm, load_tokenizer, resolve_model
from neurolight.lightning_modules.send.answer_lines import Answers, StopTokens, cut_answers, stop_tokens
from neurolight.lightning_modules.send.decode import Generation, Sampler, decode
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
    def samplers(self, num_samples: int) -> list[Sampler]:
        """Row 0 of a prompt: the scored answer (greedy, or the temperature / top_p / top_k draw); rows 1 to
        ``num_samples``: the sampled answers of hallucination detection (hd_*)."""
        hp = self.hparams
        scored = Sampler(hp.temperature, hp.top_p, hp.top_k) if hp.temperature > 0 else Sampler()
        return [scored] + [Sampler(hp.hd_temperature, hp.hd_top_p, hp.hd_top_k)] * num_samples

    def generate(self, input_ids: Tensor, attention_mask: Tensor, num_samples: int = 0) -> Generation:
        """``1 + num_samples`` rows per prompt (``samplers``), consecutive, of at most ``max_new_tokens`` answer
        tokens, from one decoding loop (``decode``); with ``num_samples`` the hidden states of ``embedding_layer``."""
        hp = self.hparams
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        return decode(
            self.model, input_ids, attention_mask, self.samplers(num_samples), hp.max_new_tokens, self.stops, pad,
            energy_temperature=hp.energy_temperature, hidden_layer=self.layer if num_samples else None,
        )  # fmt: skip

    @staticmethod
    def statistics(generation: Generation, answers: Answers) -> TokenStatistics:
        """Mean log-probability and energy of each answer's tokens (``detection_scores.token_statistics``)."""
        lengths = scored_lengths(answers.num_tokens, answers.stopped, generation.tokens.shape[1])
        return token_statistics(generation.logprob, generation.energy, lengths)

    @staticmethod
    def answer_embeddings(hidden: Tensor, answers: Answers) -> Tensor:
        """(rows, d) float32: hidden state ``self.layer`` at each answer's last token (the position whose output
        ended the answer, as INSIDE reads it from generate; the last prompt token for an empty answer), from
        ``Generation.hidden`` (rows, steps, d) of these rows: an answer of n tokens ends at step n's input.
        """
        rows = torch.arange(len(hidden), device=hidden.device)
        return hidden[rows, answers.num_tokens.to(hidden.device)]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One dict per question: ``question_id``, ``question``, ``reference_answer`` (the training target),
        ``answers`` (every gold answer), ``prompt``, ``generated_response``, its ``perplexity`` and ``energy``,
        TruthfulQA's ``correct_answers`` / ``incorrect_answers`` where the record has them, ``index`` (position in
        the test split); with ``num_generations`` >= 2 also ``sampled_responses`` (K texts), ``answer_eigenscore``,
        ``answer_ees``, ``ln_entropy`` and ``lexical_similarity``; with ``judge_model``, ``judge_p_yes``."""
        input_ids, attention_mask, records = batch["input_ids"], batch["attention_mask"], batch["records"]
        k = self.hparams.num_generations
        generation = self.generate(input_ids, attention_mask, num_samples=k)
        per_prompt = torch.arange(len(generation.tokens), device=generation.tokens.device).view(len(input_ids), 1 + k)
        greedy = _rows(generation, per_prompt[:, 0])
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
        if k >= 2:
            for row, scores in enumerate(self.sample_scores(_rows(generation, per_prompt[:, 1:].flatten()), k)):
                rows[row] |= scores
        if self.judge is not None:
            gold = [list(record.answers) or [record.answer] for record in records]
            p_yes = self.judge.p_yes([r.question for r in records], gold, answers.texts)
            for row, value in zip(rows, p_yes.tolist()):
                row["judge_p_yes"] = value
        return rows

    def sample_scores(self, generation: Generation, k: int) -> Iterable[dict]:
        """Per prompt, from its K sampled rows of ``generation`` (consecutive): the answer texts
        (``sampled_responses``) and the scores computed from them, ``answer_eigenscore``, ``answer_ees``,
        ``ln_entropy`` and ``lexical_similarity``."""
        hp = self.hparams
        sampled = cut_answers(generation.tokens, self.stops, self.tokenizer)
        mean_logprob = self.statistics(generation, sampled).mean_logprob
        embeddings = self.answer_embeddings(generation.hidden, sampled)
        for start in range(0, len(generation.tokens), k):
            rows = slice(start, start + k)  # one question's K answers
            texts = sampled.texts[rows]
            yield {
                "sampled_responses": texts,
                "answer_eigenscore": float(eigenscore(embeddings[rows], alpha=hp.alpha)),
                "answer_ees": float(
                    efficient_eigenscore(embeddings[rows], alpha=hp.alpha, seed=0, method=hp.ees_method)
                ),
                "ln_entropy": ln_entropy(mean_logprob[rows].tolist()),
                "lexical_similarity": lexical_similarity(texts),
            }


def _rows(generation: Generation, index: Tensor) -> Generation:
    return Generation(*(None if field is None else field[index] for field in generation))
