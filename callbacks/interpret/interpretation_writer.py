"""InterpretationWriter: stores each batch of interpreted latents as soon as it is done, and writes the browser.

Works with any LightningModule that names its scorers (``scorer_names``) and whose ``predict_step`` returns, per
batch, a list of interpretation dicts (``latent``, ``explanation``, the scorers' fields, ``frequency``,
``max_activation``, ``top_tokens``, ``explainer``; ``neurolight.lightning_modules.LatentInterpreter``), and a
datamodule with ``.samples`` (``InterpretationSamples``) and ``skip_latents(latents)``
(``neurolight.datamodules.InterpretationDataModule``).

- Schema: the module's scorers go into the SAE's stored metadata; the store adds their fields to its columns
  (mapping), and the summary and the browser show a column per scorer of the store.
- Resume: in ``setup`` rank 0 lists the latents already in the store and every rank tells the datamodule to skip
  them, so a rerun (or a run after a kill) only interprets what is missing.
- Nothing computed is lost: a batch is upserted right after it is computed; a batch the store refuses (server
  down, key revoked) goes to ``<fallback_dir>/<index>.unstored.rank<R>.jsonl`` and is uploaded first by the next
  run.
- DDP: every rank writes the latents it interpreted (ids are latent indices, so each latent is stored once).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from neurolight.callbacks.interpret.stores.base import LatentStore, LatentStoreError, sae_index_name, to_document
from neurolight.lightning_modules.interpret.scorers import score_fields

log = logging.getLogger(__name__)


class InterpretationWriter(BasePredictionWriter):
    def __init__(
        self,
        store: LatentStore,
        browser_path: str | None = None,
        fallback_dir: str | None = None,
        index_name: str | None = None,
    ) -> None:
        """
        Args:
            store: Where documents go: ``neurolight.callbacks.SQLiteStore`` (a local file, no server) or
                ``neurolight.callbacks.ElasticsearchStore`` (one index per SAE; give the API key through its
                ``api_key_env``).
            browser_path: Write the static HTML feature browser of every stored latent of the SAE here at the end
                (null: none).
            fallback_dir: Folder for batches the store could not take (JSON lines, uploaded by the next run);
                default: the Trainer's ``default_root_dir``.
            index_name: Index (table entry) of this SAE in the store; default: named from the SAE's model, layer
                type, layer, sizes, learning rate and sparsity coefficient (``sae_index_name``).
        """
        super().__init__(write_interval="batch")
        self.store = store
        self.browser_path = browser_path
        self.fallback_dir = fallback_dir
        self.index_name = index_name
        self.index: str | None = None
        self.metadata: dict = {}
        self.skipped = 0
        """Latents of the samples that were already stored when this run started."""
        self.written: list[int] = []
        """Latents this rank stored in this run."""
        self.unstored: list[int] = []
        """Latents this rank could not store in this run (they are in the fallback file)."""
        self.browser: Path | None = None
        """The feature browser written by the last run (rank 0)."""
        self._nothing_to_do = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        samples = getattr(trainer.datamodule, "samples", None)
        if samples is None or not hasattr(trainer.datamodule, "skip_latents"):
            raise TypeError(
                f"InterpretationWriter needs a datamodule with .samples and skip_latents(); got "
                f"{type(trainer.datamodule).__name__}: use neurolight.datamodules.InterpretationDataModule"
            )
        scorers = getattr(pl_module, "scorer_names", None)
        if scorers is None:
            raise TypeError(
                "InterpretationWriter needs the LightningModule's scorer_names (the scorers whose fields its "
                f"predictions carry); got {type(pl_module).__name__}: use "
                "neurolight.lightning_modules.LatentInterpreter"
            )
        self.metadata = {**samples.metadata, "scorers": list(scorers)}
        self.index = self.index_name or sae_index_name(self.metadata)
        self.written, self.unstored, self.browser = [], [], None
        # Rank 0 alone reads the store and broadcasts what it found: ranks that read on their own could see
        # different sets (a fast rank already writing) and split the remaining latents inconsistently.
        found: tuple[str, object] | None = None
        if trainer.is_global_zero:
            try:
                self.store.open(self.index, self.metadata)
                self._upload_fallback(trainer)
                found = ("stored", sorted(self.store.stored_latents()))
            except LatentStoreError as error:
                found = ("error", str(error))
        found = trainer.strategy.broadcast(found, src=0)
        if found[0] == "error":
            raise LatentStoreError(found[1])
        if not trainer.is_global_zero:
            self.store.open(self.index, self.metadata)
        skip = sorted(set(found[1]) & set(samples.latents.tolist()))
        self.skipped = len(skip)
        trainer.datamodule.skip_latents(skip)
        # The datamodule may interpret fewer than all sampled latents (max_latents); ask it what is left.
        pending = getattr(trainer.datamodule, "pending_latents", None)
        remaining = len(pending()) if pending else len(samples.latents) - len(skip)
        # Lightning runs no predict hooks over an empty dataloader; teardown then reports and writes the browser.
        self._nothing_to_do = remaining == 0
        rank_zero_info(
            f"InterpretationWriter: {len(skip)} of {len(samples.latents)} sampled latents are already in "
            f"{self.store.describe()}; {remaining} to interpret in this run"
        )

    def fallback_file(self, trainer, rank: int | str) -> Path:
        directory = Path(self.fallback_dir or trainer.default_root_dir).expanduser()
        return directory / f"{self.index}.unstored.rank{rank}.jsonl"

    def _upload_fallback(self, trainer) -> None:
        """Stores what earlier runs could not, then deletes their fallback files."""
        for path in sorted(self.fallback_file(trainer, "*").parent.glob(self.fallback_file(trainer, "*").name)):
            documents = []
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    documents.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: that latent is not stored, so it is redone
                    log.warning(f"{path}:{number} is not a whole document (a run stopped mid-write); skipped")
            self.store.upsert(documents)
            path.unlink()
            rank_zero_info(f"InterpretationWriter: uploaded {len(documents)} latents kept in {path} by an earlier run")

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        documents = [to_document(interpretation, self.index, self.metadata) for interpretation in prediction]
        if not documents:
            return
        latents = [doc["latent"] for doc in documents]
        try:
            self.store.upsert(documents)
            self.written += latents
        except LatentStoreError as error:
            path = self.fallback_file(trainer, trainer.global_rank)
            self._keep(path, documents, error)
            self.unstored += latents
            log.warning(f"{error}; kept latents {latents} in {path} (the next run uploads them first)")

    @staticmethod
    def _keep(path: Path, documents: list[dict], error: LatentStoreError) -> None:
        """Appends ``documents`` to the fallback file; where that fails too (the same full disk), the file is cut back
        to its whole lines and the run stops: nothing more it computes could be kept."""
        size = path.stat().st_size if path.is_file() else None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.writelines(json.dumps(doc) + "\n" for doc in documents)
        except OSError as fallback_error:
            if size is None:
                path.unlink(missing_ok=True)
            elif path.is_file():
                os.truncate(path, size)
            raise LatentStoreError(
                f"{error}; nor could latents {[doc['latent'] for doc in documents]} be kept in {path} "
                f"({fallback_error.strerror or fallback_error})"
            ) from fallback_error

    def on_predict_end(self, trainer, pl_module) -> None:
        self._nothing_to_do = False
        counts = torch.tensor([len(self.written), len(self.unstored)], device=pl_module.device)
        written, unstored = (int(n) for n in trainer.strategy.reduce(counts, reduce_op="sum"))
        trainer.strategy.barrier("InterpretationWriter.on_predict_end")  # every rank has written its latents
        if trainer.is_global_zero:
            self._report(trainer, written, unstored)
        if unstored:  # every rank raises (the count is global): the run failed its job, whatever it printed
            raise LatentStoreError(
                f"{unstored} interpreted latents could not be stored and wait in {self.fallback_file(trainer, '*')}; "
                "fix the store (see the warnings above) and rerun the same command: it uploads them first"
            )

    def _report(self, trainer, written: int, unstored: int) -> None:
        """Prints the summary and writes the browser (rank 0)."""
        kept = f", {unstored} kept in {self.fallback_file(trainer, '*')} after store errors" if unstored else ""
        message = f"\ninterpreted {written + unstored} latents ({written} stored{kept}), skipped {self.skipped}"
        try:
            documents = self.store.documents()
        except LatentStoreError as error:
            print(f"{message} already stored; reading the store back failed, so no summary or browser: {error}")
            return
        means = []
        for field in score_fields(self.store.scorers):
            scores = [doc[field.name] for doc in documents if _finite(doc[field.name])]
            mean = f"{sum(scores) / len(scores):.3f}" if scores else "n/a"
            chance = "" if field.chance is None else f", chance {field.chance:g}"
            means.append(f", mean {field.title} {mean} ({len(scores)} scored{chance})")
        if self.browser_path:
            self.browser = self._write_browser(trainer, documents)
        print(
            f"{message} already stored; {self.store.describe()} holds {len(documents)} latents{''.join(means)}"
            + (f"; feature browser: {self.browser}" if self.browser else "")
        )

    def _write_browser(self, trainer, documents: list[dict]) -> Path:
        from neurolight.callbacks.interpret.feature_browser import write_feature_browser
        from neurolight.datamodules.llm.models import load_tokenizer

        tokenizer = load_tokenizer(str(self.metadata["model_name"]))
        samples = trainer.datamodule.samples
        path = Path(self.browser_path)
        return write_feature_browser(samples, documents, tokenizer, path, scorers=self.store.scorers)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._nothing_to_do = False
        self.store.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._nothing_to_do and trainer.is_global_zero:
            self._report(trainer, 0, 0)
        self._nothing_to_do = False
        self.store.close()


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)
