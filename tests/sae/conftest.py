"""The tiny corpus and its activation cache, harvested once for the cache tests of this folder."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.cache import harvest_tiny
from tests.helpers.sae import build_tiny_corpus


@pytest.fixture(scope="session")
def cache_corpus(tmp_path_factory, tiny_model_dir):
    """192 contexts of 16 tokens (``tests.helpers.sae.build_tiny_corpus``)."""
    return build_tiny_corpus(tmp_path_factory.mktemp("cache-corpus"), tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, cache_corpus, tiny_model_dir):
    """``tests.helpers.cache.harvest_tiny`` of ``cache_corpus``, harvested on one torch thread (as the kill -9 runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return harvest_tiny(tmp_path_factory.mktemp("cache") / "cache", cache_corpus, tiny_model_dir)
    finally:
        torch.set_num_threads(threads)
