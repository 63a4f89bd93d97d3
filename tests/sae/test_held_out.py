"""The held-out batches under DDP (datamodules/sae/held_out.py): every held-out context or row is validated once, on
ranks that each get the same number of batches, as Lightning's DistributedSampler splits them; one process keeps the
plain batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from neurolight.datamodules import CachedActivationDataModule
from neurolight.datamodules.sae.held_out import held_out_batches
from tests.helpers.cache import write_index_cache
from tests.helpers.sae import make_datamodule


def per_rank(loader: DataLoader, world: int) -> list[list[torch.Tensor]]:
    """The batches each rank validates: the loader's dataset split as Lightning splits a validation set."""
    return [
        [loader.dataset[i] for i in DistributedSampler(loader.dataset, world, rank, shuffle=False)]
        for rank in range(world)
    ]


@pytest.mark.parametrize("items", [1, 7, 10, 64, 65, 200])
@pytest.mark.parametrize("batch_size", [1, 4, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranges__cover_every_item_once_in_a_count_the_world_divides(items, batch_size, world):
    try:
        ranges = held_out_batches(items, batch_size, world, "contexts")
    except ValueError as error:  # only where no such split exists
        count = world * -(-items // (world * batch_size))
        assert count > items and str(error) == (
            f"{items} held-out contexts in batches of at most {batch_size} cannot give each of the {world} ranks the "
            f"same number of non-empty batches; hold out at least {count} contexts, or raise the batch size"
        )
        return
    sizes = [stop - start for start, stop in ranges]
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(items))
    assert len(ranges) % world == 0 and 1 <= min(sizes) and max(sizes) <= batch_size
    if world == 1:
        assert sizes == [batch_size] * (items // batch_size) + ([items % batch_size] if items % batch_size else [])
    else:
        assert max(sizes) - min(sizes) <= 1 and len(ranges) == world * -(-items // (world * batch_size))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_cached_validation__each_held_out_row_once_and_as_many_batches_on_every_rank(tmp_path, world):
    cache = write_index_cache(tmp_path / "cache", num_contexts=26, rows_per_context=5)  # row i holds i
    datamodule = CachedActivationDataModule(str(cache), val_contexts=2, val_batch_size=4, block_rows=5)
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=world, training=False)
    datamodule.setup("fit")
    ranks = per_rank(datamodule.val_dataloader(), world)
    assert len({len(batches) for batches in ranks}) == 1
    rows = torch.cat([batch for batches in ranks for batch in batches])[:, 0]
    assert sorted(rows.long().tolist()) == list(range(120, 130))  # the 10 rows of the 2 held-out contexts


def test_llm_validation__each_held_out_context_once_on_two_ranks_and_plain_batches_on_one(cache_corpus, tiny_model_dir):
    datamodule = make_datamodule(cache_corpus, tiny_model_dir, val_contexts=13, val_batch_size=4, device_llm="cpu")
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=2, training=False)
    datamodule.setup("fit")
    held_out = datamodule.corpus.batch(range(len(datamodule.corpus) - 13, len(datamodule.corpus)))[:, :16]
    ranks = per_rank(datamodule.val_dataloader(), 2)
    assert [[len(batch) for batch in batches] for batches in ranks] == [[4, 3], [3, 3]]  # 13 contexts in 4 batches
    assert torch.equal(torch.cat([ranks[r][b] for b in range(2) for r in range(2)]), held_out)
    datamodule.trainer.world_size = 1
    assert [len(batch) for batch in datamodule.val_dataloader()] == [4, 4, 4, 1]
