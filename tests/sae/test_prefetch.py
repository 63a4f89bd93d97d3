"""Reading ahead in a thread (``datamodules/prefetch.py``) and the cached stream that uses it: the same batches in the
same order, at most ``depth`` items ahead, the source's errors raised in the consumer, and a thread that always
ends (exhausted, closed, dropped, or at the end of a fit)."""

from __future__ import annotations

import gc
import threading
import time
import traceback
from types import SimpleNamespace

import pytest
import torch

from neurolight.datamodules import CachedActivationDataModule
from neurolight.datamodules.prefetch import Prefetcher
from tests.helpers.cache import TINY_SITES
from tests.helpers.sae import make_module, make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "neurolight-prefetch"]


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_prefetcher__yields_the_sources_items_in_order_then_its_thread_ends():
    prefetcher = Prefetcher(iter(range(100)), depth=3, transform=lambda x: 2 * x)
    assert list(prefetcher) == [2 * x for x in range(100)]
    assert wait_until(lambda: not prefetcher.alive)
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_prefetcher__reads_at_most_depth_items_ahead():
    produced = []

    def source():
        for item in range(1000):
            produced.append(item)
            yield item

    prefetcher = Prefetcher(source(), depth=3)
    taken = [next(prefetcher) for _ in range(5)]
    time.sleep(0.3)  # time for the thread to fill the queue
    # 5 taken, 3 waiting in the queue, 1 in the thread's hand waiting for room.
    assert taken == list(range(5)) and len(produced) == 5 + 3 + 1
    prefetcher.close()


def test_prefetcher__an_error_of_the_source_is_raised_by_next_with_its_traceback():
    def source():
        yield 1
        yield 2
        raise OSError("shard_000003.npy is truncated")

    prefetcher = Prefetcher(source(), depth=2)
    assert [next(prefetcher), next(prefetcher)] == [1, 2]
    with pytest.raises(OSError, match=r"shard_000003\.npy is truncated") as raised:
        next(prefetcher)
    assert "source" in [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
    assert wait_until(lambda: not prefetcher.alive)
    with pytest.raises(StopIteration):  # ended: no second error, no hang
        next(prefetcher)


@pytest.mark.parametrize("how", ["closed", "dropped"])
def test_prefetcher__closed_or_dropped_stops_its_thread_and_closes_the_source(how):
    closed = threading.Event()

    def endless():
        try:
            item = 0
            while True:
                yield item
                item += 1
        finally:
            closed.set()

    before = len(prefetch_threads())
    prefetcher = Prefetcher(endless(), depth=2)
    assert [next(prefetcher) for _ in range(3)] == [0, 1, 2]
    if how == "closed":
        prefetcher.close()
        assert not prefetcher.alive
    else:
        del prefetcher
        gc.collect()
    assert wait_until(closed.is_set) and wait_until(lambda: len(prefetch_threads()) == before)


def test_prefetcher__refuses_a_depth_below_one():
    with pytest.raises(ValueError, match="depth=0"):
        Prefetcher(iter([]), depth=0)


def cached(tiny_cache, **overrides) -> CachedActivationDataModule:
    args = dict(batch_size_autoencoder=64, shuffle_rows=512, block_rows=15, val_contexts=16, val_batch_size=120)
    return CachedActivationDataModule(str(tiny_cache), **{**args, **overrides})


@pytest.mark.parametrize("sites", [None, TINY_SITES], ids=["one_site", "two_sites"])
def test_cached_stream__read_ahead_serves_the_batches_of_the_plain_stream(tiny_cache, sites):
    site = {"sites": sites} if sites else {"layer_id": 1, "layer_type": "mlp_activations"}
    plain, ahead = cached(tiny_cache, prefetch_batches=0, **site), cached(tiny_cache, prefetch_batches=3, **site)
    for module in (plain, ahead):
        module.setup("fit")
        module.consumed = 7  # a resumed stream starts at the first batch not consumed
    expected, served = plain.train_stream(), ahead.train_stream()
    assert isinstance(served, Prefetcher) and not isinstance(expected, Prefetcher)
    for _ in range(40):  # past the end of a pass (1920 training rows = 30 batches)
        a, b = next(expected), next(served)
        pairs = [(a[s], b[s]) for s in sites] if sites else [(a, b)]
        assert all(torch.equal(x, y) for x, y in pairs)
    ahead.teardown("fit")
    assert not served.alive


def test_cached_fit__reading_ahead_trains_the_same_sae_and_leaves_no_thread(tmp_path, tiny_cache):
    before = len(prefetch_threads())
    states = []
    for depth in (0, 4):
        torch.manual_seed(0)
        module = make_module()
        make_trainer(tmp_path / str(depth), max_steps=12, ckpt_every=6, resample_every=8).fit(
            module, cached(tiny_cache, layer_id=1, layer_type="mlp_activations", prefetch_batches=depth)
        )
        states.append(module.state_dict())
        assert wait_until(lambda: len(prefetch_threads()) == before)  # teardown stopped it
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


def test_cached_stream__a_negative_read_ahead_is_refused(tiny_cache):
    with pytest.raises(ValueError, match=r"prefetch_batches=-1 must be 0 \(no reading ahead\)"):
        cached(tiny_cache, prefetch_batches=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA (bench/gpu_kit.sh check lease runs it)")
def test_cached_stream__on_cuda_the_batches_read_ahead_are_pinned(tiny_cache):
    module = cached(tiny_cache, sites=TINY_SITES, prefetch_batches=2)
    module.trainer = SimpleNamespace(
        global_rank=0, world_size=1, training=True, strategy=SimpleNamespace(root_device=torch.device("cuda", 0))
    )
    module.setup("fit")
    plain = cached(tiny_cache, sites=TINY_SITES, prefetch_batches=0)
    plain.setup("fit")
    expected, served = plain.train_stream(), module.train_stream()
    for _ in range(3):
        a, b = next(expected), next(served)
        assert all(b[site].is_pinned() and torch.equal(a[site], b[site]) for site in TINY_SITES)
    module.teardown("fit")
