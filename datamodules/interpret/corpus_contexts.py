"""CorpusContextDataModule: contexts of a tokenized corpus, for the two predict passes of the latent sampler, and
for ``neurolight validate`` of an SAE (``SaeEvaluator``), which reads the frequency pass's contexts.

Batches are ``(context_rows, input_ids)``: (B,) rows of the corpus and their (B, num_tokens) token ids. Predict
dataloader 0 holds the contexts of the frequency pass, dataloader 1 the ``num_samples`` contexts of the sampling
pass; both are prefixes of one seeded permutation of the corpus, so they mix documents. Under DDP Lightning
splits each dataloader across ranks without padding (``UnrepeatedDistributedSamplerWrapper``): every context is
read by exactly one rank.

A resumed run (``neurolight.callbacks.InterpretationSamplesWriter``'s progress snapshots) calls ``skip_contexts`` with
the
contexts each pass already took in on this rank; the dataloaders then start after them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus


class _Contexts(Dataset):
    def __init__(self, corpus: TokenizedCorpus, rows: Tensor, num_tokens: int) -> None:
        self.corpus, self.rows, self.num_tokens = corpus, rows, num_tokens

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        row = self.rows[index]
        return row, torch.from_numpy(self.corpus[int(row)][: self.num_tokens]).long()


class CorpusContextDataModule(pl.LightningDataModule):
    def __init__(
        self,
        dataset_path: str,
        frequency_tokens: int = 1_000_000,
        num_samples: int = 10_000,
        num_tokens: int | None = None,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        """
        Args:
            dataset_path: Directory written by ``neurolight-tokenize`` (the tokenized corpus).
            frequency_tokens: Tokens read by the frequency pass (rounded up to whole contexts); the firing
                frequency of every latent is counted over them.
            num_samples: Contexts scanned by the sampling pass, from which each kept latent's contexts are chosen.
            num_tokens: Tokens per context (the first ``num_tokens`` of each stored context); default: the corpus's
                context length.
            batch_size: Contexts per LLM forward pass.
            seed: Seed of the permutation of the corpus that both passes read from the start.
        """
        super().__init__()
        for name, value in {"frequency_tokens": frequency_tokens, "num_samples": num_samples}.items():
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if batch_size < 1 or (num_tokens is not None and num_tokens < 1):
            raise ValueError(f"batch_size={batch_size} and num_tokens={num_tokens} must be at least 1")
        self.save_hyperparameters()
        self.dataset_path = dataset_path
        self.num_samples = num_samples
        self.corpus: TokenizedCorpus | None = None
        self.order: Tensor | None = None
        self.skipped = (0, 0)
        """Contexts of each pass this rank leaves out (a resumed run took them in already)."""

    def setup(self, stage: str) -> None:
        if self.corpus is not None:
            return
        hp = self.hparams
        corpus = TokenizedCorpus(hp.dataset_path)
        corpus.validate()  # against the tokenizer's vocabulary; the sampler reads the corpus with that model
        if hp.num_tokens is not None and hp.num_tokens > corpus.context_length:
            raise ValueError(
                f"num_tokens={hp.num_tokens} exceeds the context length {corpus.context_length} of {hp.dataset_path}; "
                "lower num_tokens or rebuild the corpus with a longer context_length"
            )
        self.corpus = corpus
        available = f"corpus {hp.dataset_path} has {len(corpus)} contexts of {self.num_tokens} tokens"
        if self.frequency_contexts > len(corpus):
            raise ValueError(
                f"{available}; frequency_tokens={hp.frequency_tokens} needs {self.frequency_contexts}: lower "
                f"frequency_tokens to at most {len(corpus) * self.num_tokens} or tokenize more text"
            )
        if hp.num_samples > len(corpus):
            raise ValueError(f"{available}; num_samples={hp.num_samples} is more: lower it or tokenize more text")
        self.order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(hp.seed))
        world = self.trainer.world_size if self.trainer is not None else 1
        if min(self.frequency_contexts, hp.num_samples) < world:
            raise ValueError(
                f"{world} ranks need at least one context each in both passes; got {self.frequency_contexts} "
                f"frequency contexts and num_samples={hp.num_samples}"
            )

    @property
    def num_tokens(self) -> int:
        """Tokens per context, T."""
        if self.hparams.num_tokens is not None:
            return self.hparams.num_tokens
        if self.corpus is None:
            raise RuntimeError("num_tokens defaults to the corpus's context length: call setup first")
        return self.corpus.context_length

    @property
    def frequency_contexts(self) -> int:
        """Contexts of the frequency pass: enough to hold ``frequency_tokens`` tokens."""
        return math.ceil(self.hparams.frequency_tokens / self.num_tokens)

    def frequency_rows(self) -> Tensor:
        return self.order[: self.frequency_contexts]

    def sample_rows(self) -> Tensor:
        return self.order[: self.hparams.num_samples]

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def rank_contexts(self) -> tuple[int, int]:
        """Contexts of each pass that this rank reads (skipped ones included): Lightning's predict sampler gives
        rank r the items r, r + world_size, ... of each dataloader."""
        rank, world = self._rank_and_world()
        return tuple(len(range(rank, len(rows), world)) for rows in (self.frequency_rows(), self.sample_rows()))

    def skip_contexts(self, contexts_done: Sequence[int]) -> None:
        """Leave out, in each pass p, the first ``contexts_done[p]`` contexts this rank reads (a resumed run took
        them in already); call after ``setup``, before the predict dataloaders are built."""
        done, shares = tuple(int(n) for n in contexts_done), self.rank_contexts()
        if len(done) != 2 or not all(0 <= n <= share for n, share in zip(done, shares)):
            raise ValueError(f"cannot skip {done} contexts of passes of {shares} contexts on this rank")
        self.skipped = done

    def fingerprint(self) -> dict:
        """What fixes the contexts of both passes (the corpus, its permutation, how many, their length): a resumed
        run must read the ones the killed run read. The corpus is named by its contents, not its path, so a
        corpus copied elsewhere (a cluster's local scratch) still matches."""
        digest = hashlib.sha256(json.dumps(self.corpus.metadata, sort_keys=True).encode())
        for rows in (self.frequency_rows(), self.sample_rows()):
            digest.update(rows.numpy().tobytes())
        return {
            "corpus": f"{len(self.corpus)} contexts of {self.corpus.context_length} tokens",
            "num_tokens": self.num_tokens,
            "frequency_contexts": self.frequency_contexts,
            "num_samples": self.hparams.num_samples,
            "data_seed": self.hparams.seed,
            "corpus_and_rows": digest.hexdigest()[:16],
        }

    def contexts(self, rows: Tensor) -> Tensor:
        """(n, num_tokens) int64 token ids of the corpus rows ``rows`` (n,)."""
        return self.corpus.batch(rows.cpu().numpy())[:, : self.num_tokens]

    def predict_dataloader(self) -> list[DataLoader]:
        # Sequential and unshuffled: Lightning's predict sampler then gives rank r the items r, r + world, ... Leaving
        # out the first world * skipped items leaves out this rank's first `skipped` and keeps the residues mod world.
        # A rank whose share is all done gets no items: Lightning's sampler refuses a rank none of the items left.
        world, batch_size = self._rank_and_world()[1], self.hparams.batch_size
        passes = zip((self.frequency_rows(), self.sample_rows()), self.skipped, self.rank_contexts(), strict=True)
        loaders = []
        for rows, skip, share in passes:
            start = world * skip if skip < share else len(rows)
            loaders.append(DataLoader(_Contexts(self.corpus, rows[start:], self.num_tokens), batch_size=batch_size))
        return loaders

    def val_dataloader(self) -> DataLoader:
        """The frequency pass's contexts (``frequency_tokens`` tokens), for ``SaeEvaluator``. Under DDP Lightning's
        distributed sampler splits them, repeating up to world_size - 1 contexts to even out the ranks."""
        return DataLoader(
            _Contexts(self.corpus, self.frequency_rows(), self.num_tokens), batch_size=self.hparams.batch_size
        )
