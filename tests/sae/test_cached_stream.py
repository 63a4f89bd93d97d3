"""The cached activation stream (``CachedActivationDataModule``) on a synthetic cache whose row ``i`` holds ``i``: every
training row once per pass, in a seeded order, split across ranks in whole blocks, and a stream that continues at
the right row from nothing but the count of batches served."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from neurolight.datamodules import CachedActivationDataModule
from neurolight.lightning_modules import SparseAutoencoderModule, TopK
from tests.helpers.cache import write_index_cache

CONTEXTS, ROWS_PER_CONTEXT, VAL_CONTEXTS = 26, 5, 2
TRAIN_ROWS = (CONTEXTS - VAL_CONTEXTS) * ROWS_PER_CONTEXT  # 120: 12 blocks of 10; 3 ranks read 4 blocks each
BLOCK, BATCH = 10, 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_index_cache(tmp_path_factory.mktemp("index-cache"), CONTEXTS, ROWS_PER_CONTEXT)


def datamodule(cache, rank: int = 0, world: int = 1, **overrides) -> CachedActivationDataModule:
    args = dict(batch_size_autoencoder=BATCH, shuffle_rows=40, block_rows=BLOCK, val_contexts=VAL_CONTEXTS)
    module = CachedActivationDataModule(str(cache), **{**args, **overrides})
    module.trainer = SimpleNamespace(global_rank=rank, world_size=world, training=True)
    module.setup("fit")
    return module


def rows(module, batches: int, start: int = 0) -> np.ndarray:
    stream = module.batches(start)
    served = [next(stream) for _ in range(batches)]
    assert all(batch.shape == (BATCH, 4) and batch.dtype == torch.float32 for batch in served)
    return torch.cat(served)[:, 0].long().numpy()


def test_stream__every_training_row_once_per_pass_in_a_seeded_order(cache):
    served = rows(datamodule(cache), 2 * TRAIN_ROWS // BATCH)  # two passes
    first, second = served[:TRAIN_ROWS], served[TRAIN_ROWS:]
    assert sorted(first) == sorted(second) == list(range(TRAIN_ROWS))  # the held-out rows never served
    assert not np.array_equal(first, second)  # each pass its own order
    assert np.array_equal(rows(datamodule(cache), 30), served)  # the same seed, the same order
    assert not np.array_equal(rows(datamodule(cache, seed=1), 15), first)
    # Mixed: a batch takes rows of several blocks, not a run of neighbours.
    assert all(len(set(batch // BLOCK)) >= 2 for batch in first.reshape(-1, BATCH))


def test_stream__ranks_split_each_pass_into_disjoint_whole_blocks(cache):
    per_rank = [rows(datamodule(cache, rank, 3), 2 * 40 // BATCH) for rank in range(3)]  # 40 rows a pass each
    for rank_pass in (slice(0, 40), slice(40, 80)):
        shares = [set(share[rank_pass]) for share in per_rank]
        assert sorted(set().union(*shares)) == list(range(TRAIN_ROWS)) and sum(map(len, shares)) == TRAIN_ROWS
        for share in shares:  # four whole blocks of ten rows
            blocks = {row // BLOCK for row in share}
            assert len(blocks) == 4 and share == {b * BLOCK + i for b in blocks for i in range(BLOCK)}


@pytest.mark.parametrize("world", [1, 3])
def test_stream__started_at_batch_k_continues_the_uninterrupted_stream(cache, world):
    for rank in range(world):
        whole = rows(datamodule(cache, rank, world), 23)
        for start in (1, 4, 5, 17):  # inside a window, at a window's and at a pass's boundary, a later pass
            assert np.array_equal(rows(datamodule(cache, rank, world), 23 - start, start), whole[start * BATCH :])


def test_state__holds_the_batches_served_and_a_new_layout_starts_a_new_pass(cache):
    saved = datamodule(cache)
    saved.consumed = 20  # in the second pass (15 batches a pass on one rank)
    state = saved.state_dict()
    resumed = datamodule(cache)
    resumed.load_state_dict(state)
    assert (resumed.first_pass, resumed.consumed) == (0, 20)
    assert np.array_equal(rows(resumed, 3, resumed.consumed), rows(saved, 3, 20))
    other = datamodule(cache, 1, 3)
    with pytest.warns(UserWarning, match=r"layout changed \(world_size 1 -> 3\).*new pass"):
        other.load_state_dict(state)
    assert (other.first_pass, other.consumed) == (2, 0)
    pass_2_of_rank_1 = rows(datamodule(cache, 1, 3), 15)[80:]  # 40 rows a pass
    assert np.array_equal(rows(other, 5), pass_2_of_rank_1)


def test_validation__the_rows_of_the_held_out_contexts_once_in_order(cache):
    batches = list(datamodule(cache, val_batch_size=4).val_dataloader())
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.cat(batches)[:, 0].tolist() == list(range(TRAIN_ROWS, CONTEXTS * ROWS_PER_CONTEXT))


def test_mean_activation_norm__is_the_manifests_over_all_rows(cache):
    expected = np.mean([np.linalg.norm([i] * 4) for i in range(CONTEXTS * ROWS_PER_CONTEXT)])
    assert datamodule(cache).mean_activation_norm() == pytest.approx(expected, rel=1e-12)


def test_site_choice__a_missing_site_or_an_ambiguous_one_is_refused_naming_the_sites(cache):
    with pytest.raises(ValueError, match=r"holds no site layers\.3\.mlp_sublayer \(it holds layers\.0\.mlp_sublayer\)"):
        datamodule(cache, layer_id=3, layer_type="mlp_sublayer")
    with pytest.raises(ValueError, match=r"harvested from tiny \(tiny\), but the recipe names model_name other/model"):
        datamodule(cache, model_name="other/model")


class RecordRows(pl.Callback):
    """Saves the rows (their index, feature 0) each rank trained on, in order, to ``folder/rank<r>.pt``."""

    def __init__(self, folder) -> None:
        self.folder, self.rows = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.rows.append(batch[:, 0].long().cpu())

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(torch.cat(self.rows), self.folder / f"rank{trainer.global_rank}.pt")


# DDP: two spawned processes import torch and Lightning: ~20 s on 2 shared cores
def test_ddp__two_ranks_train_on_their_own_blocks_every_row_once_per_pass(cache, tmp_path, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    data = CachedActivationDataModule(str(cache), batch_size_autoencoder=BATCH, shuffle_rows=40, block_rows=BLOCK,
                                      val_contexts=VAL_CONTEXTS)  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=15, max_epochs=-1, logger=False,
        callbacks=[RecordRows(tmp_path)], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(SparseAutoencoderModule(4, 8, TopK(k=2), max_l0_fraction=None), data)
    trained = [torch.load(tmp_path / f"rank{rank}.pt").numpy() for rank in range(2)]
    for rank in range(2):  # 6 blocks of 10 rows each a pass, 2 passes in 15 steps of 8
        assert np.array_equal(trained[rank], rows(datamodule(cache, rank, 2), 15))
    for rank_pass in (slice(0, 60), slice(60, 120)):
        assert sorted(np.concatenate([t[rank_pass] for t in trained])) == list(range(TRAIN_ROWS))
