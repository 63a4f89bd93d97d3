"""InterpretationDataModule: one explain-simulate-score task per sampled latent, for ``LatentInterpreter``.

    neurolight predict --config configs/interpret/demo.yaml

Reads a samples directory (``datamodules/interpret/samples.py``) and decodes its tokens with the tokenizer of
the model the samples came from (``metadata["model_name"]``), so any explainer, whatever its own tokenizer, reads
the same text. Where the sampler left position 0 out (``metadata["exclude_first_position"]``) its activation was
never measured (the sampler stored 0), so every record starts at position 1: no prompt shows position 0, as silent
or otherwise, and no score counts it (docs/interpret.md, Records and held-out split). Per latent it splits the
records, deterministically given ``seed`` and the latent:

- explanation records: ``num_interpretation_samples`` top records, every other one by rank
  (``interleaved_explanation``);
- simulation records (held out): ``num_simulation_samples`` drawn half from the remaining top and the quantile
  records, half from the random ones (the other side fills in when one runs short), never a context shown in the
  explanation prompt;
- detection contexts: up to ``num_detection_samples`` held-out top/quantile contexts (activating) and as many
  ``negative`` ones (contexts where the latent never fires);
- fuzzing contexts: up to ``num_fuzzing_samples`` held-out top/quantile contexts, each once with its activating
  tokens marked and once with as many tokens where the latent does not fire marked instead, visible tokens only
  (``fuzzing_marks``).

The scorers (``neurolight.lightning_modules.interpret.scorers``) read these record sets; a set whose
``num_*_samples`` is 0 stays empty.

Ranks: the latents to run are fixed on rank 0 (after ``skip_latents``) and broadcast; rank r takes every
world-th one from r, so each latent runs on exactly one rank. Ranks with fewer latents get padding tasks (a copy
of a real one, flagged ``padding``, whose result the interpreter drops) until all ranks have the same number of
batches: under DeepSpeed ZeRO-3 every forward pass is collective, and Lightning refuses a rank without a batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from neurolight.datamodules.interpret.samples import InterpretationSamples, Record
from neurolight.datamodules.llm.models import load_tokenizer


class TokenRecord(NamedTuple):
    """A record ready for prompting: its measured tokens as strings (decoded with the sampled model's tokenizer):
    every position of the context, or all but position 0 where the sampler left it out."""

    kind: str
    """``top``, ``quantile``, ``random`` or ``negative``."""
    context_index: int
    """Index of the context in the tokenized corpus."""
    tokens: list[str]
    """(T',) the decoded text of every measured token, unescaped (T' = T, or T - 1 without position 0)."""
    activations: Tensor
    """(T',) float32 true activation of the latent at every measured token."""


MARK_FRACTION = 0.3
"""A fuzzing context marks the tokens whose activation exceeds this fraction of the context's peak (delphi's
threshold; "Automatically interpreting millions of features in LLMs", Paulo et al. 2024)."""


class MarkedRecord(NamedTuple):
    """A context with some tokens marked, for the fuzzing score."""

    record: TokenRecord
    """The context."""
    marked: list[bool]
    """(T,) True for the tokens shown between the marks."""
    correct: bool
    """True: the marks are where the latent fires; False: on as many tokens where it does not."""


class LatentTask(NamedTuple):
    """Everything the interpreter needs for one latent."""

    latent: int
    """Index of the latent in the SAE (0..d_sae-1)."""
    frequency: float
    """Firing frequency of the latent in the sampler's frequency pass."""
    max_activation: float
    """Largest activation of the latent over the sampling pass (the 0-10 scale's 10)."""
    explanation: list[TokenRecord]
    """Records shown to the explainer (top records, descending max activation)."""
    simulation: list[TokenRecord]
    """Held-out records whose activations are simulated and correlated."""
    detection: list[TokenRecord]
    """Held-out activating contexts followed by non-activating (``negative``) ones."""
    detection_labels: list[bool]
    """Per detection context: True = the latent fires in it."""
    fuzzing: list[MarkedRecord]
    """Held-out activating contexts with correct marks, then the same contexts with wrong ones."""
    top_tokens: list[str]
    """Up to 10 distinct token strings with the highest activations in the top records."""
    padding: bool = False
    """A copy that only evens out per-rank work under ZeRO-3; its result is dropped."""


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded context (leading spaces of SentencePiece tokens included), by
    decoding growing prefixes; a token that ends inside a multi-byte character is decoded on its own."""
    strings, previous = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if text.startswith(previous):
            strings.append(text[len(previous) :])
        else:
            strings.append(tokenizer.decode(ids[end - 1 : end]))
        previous = text
    return strings


def fuzzing_marks(record: TokenRecord, rng: random.Random) -> tuple[list[bool], list[bool]] | None:
    """Correct and wrong marks of an activating context, or None when it has none of one kind.

    Only visible tokens (text that is not blank) are marked, correct and wrong alike: a blank token's mark shows as an
    empty ``<<>>``, and were only one kind ever empty, its emptiness would give the answer away (docs/interpret.md,
    Fuzzing). Correct: the visible tokens above ``MARK_FRACTION`` of the context's peak. Wrong: as many tokens
    (fewer when the context has fewer) drawn from the visible ones where the latent does not fire."""
    activations = record.activations.tolist()
    peak = max(activations, default=0.0)
    visible = [bool(token.strip()) for token in record.tokens]
    correct = [a > MARK_FRACTION * peak and shown for a, shown in zip(activations, visible, strict=True)]
    silent = [i for i, (a, shown) in enumerate(zip(activations, visible)) if a <= 0 and shown]
    if peak <= 0 or not any(correct) or not silent:
        return None
    wrong = set(rng.sample(silent, min(sum(correct), len(silent))))
    return correct, [i in wrong for i in range(len(correct))]


class _Tasks(Dataset):
    """This rank's tasks, built when read (a run may cover tens of thousands of latents)."""

    def __init__(self, module: InterpretationDataModule, latents: list[int], padding: list[int]) -> None:
        self.module, self.latents, self.padding = module, latents, padding

    def __len__(self) -> int:
        return len(self.latents) + len(self.padding)

    def __getitem__(self, index: int) -> LatentTask:
        if index < len(self.latents):
            return self.module.task(self.latents[index])
        return self.module.task(self.padding[index - len(self.latents)])._replace(padding=True)


def interleaved_explanation(top: list, n: int) -> list:
    """The explanation's ``n`` records of a latent's ``top`` records (descending max activation): ranks 0, 2, 4, ...,
    so that the held-out top records (ranks 1, 3, 5, ..., then the rest) are as strong as those the explainer saw, as
    in Bills et al.'s interleaved splits; the first ``n`` where there are fewer than ``2 n`` (docs/interpret.md, Records
    and held-out split)."""
    return top[0 : 2 * n : 2] if len(top) >= 2 * n else top[:n]


class InterpretationDataModule(pl.LightningDataModule):
    def __init__(
        self,
        samples_path: str,
        num_interpretation_samples: int = 5,
        num_simulation_samples: int = 10,
        num_detection_samples: int = 8,
        num_fuzzing_samples: int = 8,
        max_latents: int | None = None,
        batch_size: int = 1,
        seed: int = 0,
    ) -> None:
        """
        Args:
            samples_path: Directory written by the latent sampler (``metadata.json`` + ``samples.safetensors``).
            num_interpretation_samples: Top records shown to the explainer.
            num_simulation_samples: Held-out records simulated and scored, half top/quantile and half random
                (docs/interpret.md, Records and held-out split).
            num_detection_samples: Activating and, as many, non-activating contexts of the detection score; 0 = none.
            num_fuzzing_samples: Activating contexts of the fuzzing score, each shown once with its activating tokens
                marked and once with as many other tokens marked; 0 = none.
            max_latents: Interpret only the first this many sampled latents (ascending index; a resumed run picks
                the same ones); None = all.
            batch_size: Latents per predict step (their explanations are generated together).
            seed: Seed of the held-out draws (with the latent index, so a latent's split does not depend on which
                other latents run).
        """
        super().__init__()
        for name, value in (
            ("num_interpretation_samples", num_interpretation_samples),
            ("num_simulation_samples", num_simulation_samples),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        for name, value in (
            ("num_detection_samples", num_detection_samples),
            ("num_fuzzing_samples", num_fuzzing_samples),
        ):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0 (0 = no records for that score)")
        if max_latents is not None and max_latents < 1:
            raise ValueError(f"max_latents={max_latents} must be at least 1, or null for every sampled latent")
        self.save_hyperparameters()
        self.samples: InterpretationSamples | None = None
        self.tokenizer = None
        self.latents: list[int] = []
        self.skipped: set[int] = set()
        self.first_position = 0
        """The first position whose activation the sampler measured: 1 where it left position 0 out, else 0."""
        self._strings: dict[int, list[str]] = {}

    def setup(self, stage: str) -> None:
        if self.samples is not None:
            return
        self.samples = InterpretationSamples(Path(self.hparams.samples_path).expanduser())
        model_name = self.samples.metadata.get("model_name")
        if not model_name:
            raise ValueError(f"{self.hparams.samples_path}/metadata.json names no model_name to decode tokens with")
        excluded = self.samples.metadata.get("exclude_first_position")
        if excluded is None:
            raise ValueError(
                f"{self.hparams.samples_path}/metadata.json does not say whether the sampler left position 0 out "
                "(exclude_first_position), so it is unknown whether the stored 0s there were measured; sample again "
                "with neurolight predict --config configs/interpret/sample.yaml, or add the key as it was sampled"
            )
        self.first_position = int(bool(excluded))
        self.tokenizer = load_tokenizer(model_name)
        latents = self.samples.latents.tolist()
        self.latents = latents[: self.hparams.max_latents] if self.hparams.max_latents else latents

    def skip_latents(self, latents: Iterable[int]) -> None:
        """Leave out latents already interpreted (a resumed run); call after ``setup``, before the predict
        dataloader is built."""
        if self.samples is None:
            raise RuntimeError("skip_latents needs the samples: call it after InterpretationDataModule.setup")
        self.skipped |= {int(latent) for latent in latents}

    def pending_latents(self) -> list[int]:
        return [latent for latent in self.latents if latent not in self.skipped]

    # ---------------------------------------------------------------------------------------------------- tasks
    def _token_record(self, record: Record) -> TokenRecord:
        first = self.first_position
        if record.context_index not in self._strings:
            # Decoded whole, then cut: position 1 keeps the text it adds after position 0 (its leading space).
            self._strings[record.context_index] = token_strings(self.tokenizer, record.token_ids.tolist())[first:]
        return TokenRecord(
            record.kind, record.context_index, self._strings[record.context_index], record.activations[first:]
        )

    def task(self, latent: int) -> LatentTask:
        hp = self.hparams
        records = self.samples.all_records(latent)
        explanation = interleaved_explanation(records["top"], hp.num_interpretation_samples)
        shown = {r.context_index for r in explanation}

        def fresh(candidates: list[Record], taken: set[int]) -> list[Record]:
            kept = []
            for record in candidates:
                if record.context_index not in taken:
                    kept.append(record)
                    taken.add(record.context_index)
            return kept

        activating = fresh(records["top"] + records["quantile"], set(shown))
        randoms = fresh(records["random"], shown | {r.context_index for r in activating})
        rng = random.Random(f"{hp.seed}:{latent}")  # string seeds hash with SHA-512: the same on every run
        n_activating = min(len(activating), math.ceil(hp.num_simulation_samples / 2))
        n_random = min(len(randoms), hp.num_simulation_samples - n_activating)
        n_activating = min(len(activating), hp.num_simulation_samples - n_random)
        simulation = rng.sample(activating, n_activating) + rng.sample(randoms, n_random)
        positive = rng.sample(activating, min(len(activating), hp.num_detection_samples))
        negative = fresh(records["negative"], set(shown))[: hp.num_detection_samples]
        fuzzing = []
        for record in rng.sample(activating, len(activating)):  # a seeded order; fuzzing_marks may skip some
            if len(fuzzing) == hp.num_fuzzing_samples:
                break
            token_record = self._token_record(record)
            marks = fuzzing_marks(token_record, rng)
            if marks is not None:
                fuzzing.append((token_record, *marks))
        row = int((self.samples.latents == latent).nonzero()[0, 0])
        return LatentTask(
            latent=int(latent),
            frequency=float(self.samples.frequency[latent]),
            max_activation=float(self.samples.max_activation[row]),
            explanation=[self._token_record(r) for r in explanation],
            simulation=[self._token_record(r) for r in simulation],
            detection=[self._token_record(r) for r in positive + negative],
            detection_labels=[True] * len(positive) + [False] * len(negative),
            fuzzing=[MarkedRecord(record, right, True) for record, right, _ in fuzzing]
            + [MarkedRecord(record, wrong, False) for record, _, wrong in fuzzing],
            top_tokens=self._top_tokens([self._token_record(r) for r in records["top"]]),
        )

    @staticmethod
    def _top_tokens(records: list[TokenRecord], limit: int = 10) -> list[str]:
        scored = [(float(a), t) for r in records for a, t in zip(r.activations.tolist(), r.tokens, strict=True)]
        distinct: list[str] = []
        for activation, token in sorted(scored, key=lambda pair: -pair[0]):
            if activation <= 0 or len(distinct) == limit:
                break
            if token not in distinct:
                distinct.append(token)
        return distinct

    # ----------------------------------------------------------------------------------------------- dataloader
    def predict_dataloader(self) -> DataLoader:
        rank, world = 0, 1
        trainer = self.trainer
        pending = self.pending_latents()
        if trainer is not None and trainer.world_size > 1:
            # Ranks may read the store at slightly different moments; rank 0's list is the one that counts.
            pending = trainer.strategy.broadcast(pending, src=0)
            rank, world = trainer.global_rank, trainer.world_size
        mine, padding = pending[rank::world], []
        if world > 1 and pending:
            # Equal batch counts: ZeRO-3 needs every rank in every forward pass, and Lightning refuses a rank with
            # no batch; a rank with fewer latents would only wait for rank 0 anyway.
            size = self.hparams.batch_size
            batches = math.ceil(math.ceil(len(pending) / world) / size)  # rank 0's, the most of any rank
            padding = [pending[0]] * max(0, (batches - 1) * size + 1 - len(mine))
        tasks = _Tasks(self, mine, padding)
        # Already this rank's share: a (one-replica) DistributedSampler keeps Lightning from sharding it again.
        sampler = DistributedSampler(tasks, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(tasks, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=list)
