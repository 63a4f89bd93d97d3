"""Where interpreted latents go: the store interface and its two backends."""

from neurolight.callbacks.interpret.stores.base import (
    FIELD_TYPES,
    LatentStore,
    LatentStoreError,
    sae_index_name,
    to_document,
)
from neurolight.callbacks.interpret.stores.elasticsearch import ElasticsearchStore
from neurolight.callbacks.interpret.stores.sqlite import SQLiteStore

__all__ = [
    "FIELD_TYPES",
    "ElasticsearchStore",
    "LatentStore",
    "LatentStoreError",
    "SQLiteStore",
    "sae_index_name",
    "to_document",
]
