"""Resuming a killed interpretation-sample run: runs killed in the frequency pass, in the sampling pass and before
writing continue from their progress snapshots, run the LLM only on the contexts not yet taken in, and write exactly
what one uninterrupted run writes; a snapshot of other settings is refused with what differs."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from neurolight.callbacks.interpret.samples_writer import InterpretationSamplesWriter
from neurolight.datamodules.interpret.corpus_contexts import CorpusContextDataModule
from neurolight.datamodules.interpret.samples import InterpretationSamples
from neurolight.datamodules.llm.hooked import HookedLLM
from neurolight.lightning_modules.interpret.latent_sampler import LatentSampler
from tests.helpers.sae import build_sampler_sae
from tests.interpret.test_latent_sampler import SEED, SIZES

BATCH = 8
FREQUENCY_CONTEXTS, NUM_SAMPLES = 48, 80  # 6 + 10 batches of 8


class Killed(Exception):
    """Stands in for a preemption or an out-of-memory kill."""


class KillAfter(pl.Callback):
    """Raises when ``batches`` batches are done, before the next one starts (None: after the last, before writing)."""

    def __init__(self, batches: int | None) -> None:
        self.batches, self.started = batches, 0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.started == self.batches:
            raise Killed
        self.started += 1

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        raise Killed


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory, tiny_model_dir):
    return build_sampler_sae(tmp_path_factory.mktemp("sampler"), tiny_model_dir)


@pytest.fixture(scope="module")
def passes(sae_run) -> CorpusContextDataModule:
    """The datamodule of ``run``, set up: its ``frequency_rows()`` and ``sample_rows()`` are the two passes."""
    datamodule = CorpusContextDataModule(str(sae_run[1]), FREQUENCY_CONTEXTS * 16, NUM_SAMPLES, batch_size=BATCH)
    datamodule.setup("predict")
    return datamodule


@pytest.fixture
def llm_contexts(monkeypatch) -> list[torch.Tensor]:
    """Every (B, T) batch of token ids the LLM runs on, in order."""
    seen: list[torch.Tensor] = []
    harvest = HookedLLM.harvest

    def recording(self, input_ids):
        seen.append(input_ids.clone())
        return harvest(self, input_ids)

    monkeypatch.setattr(HookedLLM, "harvest", recording)
    return seen


def run(
    sae_run, save_path, kill_after=-1, snapshot_every_n_contexts=16, overwrite=False, batch_size=BATCH, **settings
) -> None:
    """One `neurolight predict` of the sampler (``settings``: its own), killed after ``kill_after`` batches (None:
    before writing; -1: never). The killer comes first among the callbacks, so it stops a run before it writes."""
    _, corpus, checkpoint = sae_run
    settings = {"log_freq_lower": -2.0, "log_freq_upper": -1.3, "seed": SEED, **SIZES, **settings}
    module = LatentSampler(str(checkpoint), **settings)
    datamodule = CorpusContextDataModule(str(corpus), FREQUENCY_CONTEXTS * 16, NUM_SAMPLES, batch_size=batch_size)
    writer = InterpretationSamplesWriter(
        str(save_path), overwrite=overwrite, snapshot_every_n_contexts=snapshot_every_n_contexts
    )
    callbacks = [writer] if kill_after == -1 else [KillAfter(kill_after), writer]
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.predict(module, datamodule=datamodule, return_predictions=False)


@pytest.fixture(scope="module")
def uninterrupted(sae_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("whole") / "samples"
    run(sae_run, path)  # with snapshots every 2 batches: taking them changes nothing
    assert not (path / ".resume").exists()
    return path


def snapshot(path) -> dict:
    return torch.load(path / ".resume" / "rank0.pt", weights_only=True)


def assert_same_samples(path, reference) -> None:
    got, want = InterpretationSamples(path), InterpretationSamples(reference)
    assert got.metadata == want.metadata  # (the metadata has no timing fields)
    assert got.tensors.keys() == want.tensors.keys()
    for name, value in want.tensors.items():
        assert got.tensors[name].dtype == value.dtype and torch.equal(got.tensors[name], value), name


def assert_ran_on(seen: list[torch.Tensor], passes: CorpusContextDataModule, rows: torch.Tensor) -> None:
    """The LLM ran on the contexts of the corpus ``rows``, in this order, and on no other."""
    assert torch.equal(torch.cat(seen), passes.contexts(rows))


def test_resume__killed_in_each_pass_continues_without_recomputing_and_writes_what_one_run_writes(
    sae_run, passes, uninterrupted, tmp_path, llm_contexts, capsys
):
    path = tmp_path / "samples"
    with pytest.raises(Killed):  # in the frequency pass, after 5 batches: snapshots at 16 and 32 contexts
        run(sae_run, path, kill_after=5)
    assert sorted(p.name for p in path.iterdir()) == [".neurolight.lock", ".resume"]  # the lock of the killed run
    state = snapshot(path)
    assert state["pass"] == 0 and state["contexts_done"].tolist() == [32, 0] and state["samples"] is None
    assert int(state["frequency_tokens"]) == 32 * 15  # position 0 excluded

    llm_contexts.clear()
    with pytest.raises(Killed):  # resumed (a folder holding only a snapshot), killed in pass 1 after 2 + 5 batches
        run(sae_run, path, kill_after=7)
    assert "resuming pass 0 (frequency) at context 32 of 48 from " in capsys.readouterr().out
    assert_ran_on(llm_contexts, passes, torch.cat([passes.frequency_rows()[32:], passes.sample_rows()[:40]]))
    state = snapshot(path)
    assert state["pass"] == 1 and state["contexts_done"].tolist() == [48, 32]
    assert torch.equal(state["band"]["latents"], InterpretationSamples(uninterrupted).latents)
    assert (state["samples"]["top_row"] >= 0).any()

    llm_contexts.clear()
    run(sae_run, path)
    assert "resuming pass 1 (sampling) at context 32 of 80 from " in capsys.readouterr().out
    assert_ran_on(llm_contexts, passes, passes.sample_rows()[32:])
    assert_same_samples(path, uninterrupted)
    assert not (path / ".resume").exists()


def test_resume__killed_before_writing_redoes_only_the_last_batch(
    sae_run, passes, uninterrupted, tmp_path, llm_contexts
):
    path = tmp_path / "samples"
    with pytest.raises(Killed):  # every batch done, a snapshot after each but the last
        run(sae_run, path, kill_after=None, snapshot_every_n_contexts=BATCH)
    assert snapshot(path)["contexts_done"].tolist() == [FREQUENCY_CONTEXTS, NUM_SAMPLES - BATCH]
    llm_contexts.clear()
    run(sae_run, path, batch_size=4)  # another batch_size may resume (after an out-of-memory kill)
    assert_ran_on(llm_contexts, passes, passes.sample_rows()[-BATCH:])
    assert_same_samples(path, uninterrupted)


def test_resume__snapshot_of_other_settings_is_refused_with_what_differs(sae_run, tmp_path, llm_contexts, capsys):
    path = tmp_path / "samples"
    with pytest.raises(Killed):
        run(sae_run, path, kill_after=3)
    llm_contexts.clear()
    afresh = r"; rerun with its settings to continue it, or delete \S+/\.resume or set overwrite: true to start afresh$"
    with pytest.raises(ValueError, match=r"holds the progress of a killed run with other settings \(seed 7 there, 8"):
        run(sae_run, path, seed=8)
    with pytest.raises(ValueError, match=r"settings \(num_top 4 there, 5 here; num_random 3 there, 2 here\)" + afresh):
        run(sae_run, path, num_top=5, num_random=2)
    state = snapshot(path)
    state["fingerprint"]["world_size"] = 2  # as if a two-rank run had saved it
    torch.save(state, path / ".resume" / "rank0.pt")
    with pytest.raises(ValueError, match=r"other settings \(world_size 2 there, 1 here\)"):
        run(sae_run, path)
    assert llm_contexts == []  # refused before any work

    (path / "metadata.json").write_text("{}")  # finished samples beside a snapshot are not overwritten
    with pytest.raises(FileExistsError, match=r"exists and is not empty; choose another save_path or set overwrite"):
        run(sae_run, path)
    capsys.readouterr()
    run(sae_run, path, overwrite=True, seed=8)
    assert "overwrite: discarding " in capsys.readouterr().out
    assert sum(len(batch) for batch in llm_contexts) == FREQUENCY_CONTEXTS + NUM_SAMPLES  # afresh
    assert InterpretationSamples(path).metadata["seed"] == 8 and not (path / ".resume").exists()


def test_corpus_contexts__skipped_contexts_are_each_ranks_first_and_the_rest_is_read_once(sae_run):
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper

    datamodule = CorpusContextDataModule(str(sae_run[1]), frequency_tokens=40 * 16, num_samples=37, batch_size=4)
    datamodule.setup("predict")
    skips = {0: (5, 12), 1: (13, 0), 2: (0, 11)}  # each rank saved its snapshot at its own time
    for rank, skip in skips.items():
        datamodule.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        assert datamodule.rank_contexts() == (len(range(rank, 40, 3)), len(range(rank, 37, 3)))
        datamodule.skip_contexts(skip)
        all_rows = datamodule.frequency_rows(), datamodule.sample_rows()
        for loader, rows, skipped in zip(datamodule.predict_dataloader(), all_rows, skip, strict=True):
            sampler = UnrepeatedDistributedSamplerWrapper(loader.sampler, num_replicas=3, rank=rank, shuffle=False)
            assert [int(loader.dataset[i][0]) for i in sampler] == rows[rank::3][skipped:].tolist()
    with pytest.raises(ValueError, match=r"cannot skip \(14, 0\) contexts of passes of \(13, 12\) contexts"):
        datamodule.skip_contexts((14, 0))
