"""Where interpreted latents go: the store interface and its two backends."""

from neurolight.callbacks.interpret.stores.base import (
    LEGACY_SCORERS,
    LatentStore,
    LatentStoreError,
    field_types,
    sae_index_name,
    to_document,
)
from neurolight.callbacks.interpret.stores.elasticsearch import ElasticsearchStore
from neurolight.callbacks.interpret.stores.sqlite import SQLiteStore

__all__ = [
    "LEGACY_SCORERS",
    "ElasticsearchStore",
    "LatentStore",
    "LatentStoreError",
    "SQLiteStore",
    "field_types",
    "sae_index_name",
    "to_document",
]
