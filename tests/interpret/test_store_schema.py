"""The store schema follows the scorers: fields from the scorers' declarations, the scorers recorded in the SAE's
metadata, a store written with the old fixed columns (and without the later AUROC fields) still read, a later run's
new scorers and fields added as columns (SQLite) and mapping fields (Elasticsearch, on noida-db), and readers that
never create an index."""

from __future__ import annotations

import json
import sqlite3

import pytest
from elasticsearch import Elasticsearch

from neurolight.callbacks.interpret.stores import (
    LatentStoreError,
    SQLiteStore,
    field_types,
    sae_index_name,
    to_document,
)
from neurolight.callbacks.interpret.stores.elasticsearch import ElasticsearchStore
from tests.helpers.store_documents import META, expected_document, interpretation, without_time

OLD_FIELDS = {"sae": "keyword", "model": "keyword", "layer": "integer", "layer_type": "keyword",
              "latent": "integer", "explanation": "text", "score": "float", "detection_score": "float",
              "frequency": "double", "max_activation": "float", "top_tokens": "keyword", "explainer": "keyword",
              "updated_at": "date"}  # fmt: skip
"""The hand-written schema of stores written before scorers were recorded."""
LEGACY_FIELDS = {**dict(list(OLD_FIELDS.items())[:8]), "detection_auroc": "float", **dict(list(OLD_FIELDS.items())[8:])}
"""The same scorers' fields now: detection's AUROC right after its balanced accuracy."""
FUZZED = {**META, "scorers": ["simulation", "fuzzing"]}
ADDED = ["detection_auroc", "fuzzing_score", "fuzzing_auroc"]
"""Fields that an old store lacks and a run with scorers [simulation, fuzzing] adds, in order."""


def fuzzed(latent: int) -> dict:
    """An interpretation of a run with scorers [simulation, fuzzing]."""
    result = interpretation(latent, version=2)
    del result["detection_score"], result["detection_auroc"]
    return result | {"fuzzing_score": 0.75, "fuzzing_auroc": 0.875}


def test_field_types__are_the_base_fields_around_the_scorers_fields_in_order():
    assert field_types(["simulation", "detection"]) == LEGACY_FIELDS
    assert list(LEGACY_FIELDS)[6:9] == ["score", "detection_score", "detection_auroc"]
    fields = field_types(["fuzzing", "simulation"])
    assert list(fields)[5:9] == ["explanation", "fuzzing_score", "fuzzing_auroc", "score"]
    assert fields["fuzzing_score"] == fields["fuzzing_auroc"] == "float"
    assert "detection_score" not in fields and "detection_auroc" not in fields
    index = sae_index_name(META)
    assert set(to_document(fuzzed(3), index, FUZZED)) == set(field_types(FUZZED["scorers"]))
    assert to_document(fuzzed(3), index, FUZZED)["fuzzing_score"] == 0.75
    assert to_document(fuzzed(3), index, FUZZED)["fuzzing_auroc"] == 0.875
    with pytest.raises(KeyError, match="fuzzing_score"):  # a run must deliver every field of its scorers
        to_document(interpretation(3), index, FUZZED)
    with pytest.raises(ValueError, match=r"scorer 'intruder' is unknown; choose from simulation, detection, fuzzing"):
        field_types(["simulation", "intruder"])


def old_sqlite_store(path, index: str) -> None:
    """A store as written before scorers were recorded: fixed columns, metadata without ``scorers``."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE saes (sae TEXT PRIMARY KEY, metadata TEXT NOT NULL)")
        db.execute(
            "CREATE TABLE latents (sae TEXT NOT NULL, model TEXT, layer INTEGER, layer_type TEXT, "
            "latent INTEGER NOT NULL, explanation TEXT, score REAL, detection_score REAL, frequency REAL, "
            "max_activation REAL, top_tokens TEXT, explainer TEXT, updated_at TEXT, PRIMARY KEY (sae, latent))"
        )
        db.execute("INSERT INTO saes VALUES (?, ?)", (index, json.dumps(META)))
        doc = to_document(interpretation(1), index, META) | {"top_tokens": json.dumps(interpretation(1)["top_tokens"])}
        del doc["detection_auroc"]  # the old stores predate it
        db.execute(f"INSERT INTO latents VALUES ({', '.join('?' * len(doc))})", tuple(doc.values()))
    db.close()


def test_sqlite_store__reads_a_store_with_the_old_fixed_columns_and_adds_a_new_scorers_column(tmp_path):
    path, index = tmp_path / "old.sqlite", sae_index_name(META)
    old_sqlite_store(path, index)
    reader = SQLiteStore(str(path))
    reader.open(index, META, create=False)
    assert list(reader.scorers) == ["simulation", "detection"]
    assert without_time(reader.documents()) == [expected_document(1, index) | {"detection_auroc": None}]
    reader.close()
    with sqlite3.connect(path) as db:  # the reader left the file as it was
        assert [row[1] for row in db.execute("PRAGMA table_info(latents)")] == list(OLD_FIELDS)
    db.close()

    writer = SQLiteStore(str(path))
    writer.open(index, FUZZED)  # a later run scores with fuzzing instead of detection
    assert list(writer.scorers) == ["simulation", "detection", "fuzzing"]
    writer.upsert([to_document(fuzzed(latent), index, FUZZED) for latent in (1, 2)])
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(latents)")]
        metadata = json.loads(db.execute("SELECT metadata FROM saes").fetchone()[0])
    db.close()
    assert columns == [*OLD_FIELDS, *ADDED] and metadata["scorers"] == writer.scorers
    # A latent written again is replaced: its detection score belonged to the old explanation.
    gone = {"detection_score": None, "detection_auroc": None}
    new = [expected_document(k, index, 2) | gone | {"fuzzing_score": 0.75, "fuzzing_auroc": 0.875} for k in (1, 2)]
    assert without_time(writer.documents()) == new
    with pytest.raises(ValueError, match=r"fields \['intruder_score'\] that index"):
        writer.upsert([to_document(fuzzed(5), index, FUZZED) | {"intruder_score": 0.5}])
    writer.close()


def test_elasticsearch_store__reads_an_old_index_and_adds_a_new_scorers_field_to_its_mapping(es_address):
    index = sae_index_name({**META, "layer_id": 7})
    client = Elasticsearch(es_address)
    mappings = {"_meta": {"neurolight_sae": META}, "properties": {f: {"type": t} for f, t in OLD_FIELDS.items()}}
    client.indices.create(index=index, mappings=mappings)
    old = to_document(interpretation(1), index, META)
    del old["detection_auroc"]  # the old indices predate it
    client.index(index=index, id="1", document=old, refresh=True)

    reader = ElasticsearchStore(es_address, api_key_env=None)
    reader.open(index, META, create=False)
    assert list(reader.scorers) == ["simulation", "detection"]
    assert without_time(reader.documents()) == [expected_document(1, index) | {"detection_auroc": None}]
    reader.close()

    writer = ElasticsearchStore(es_address, api_key_env=None)
    writer.open(index, FUZZED)
    writer.upsert([to_document(fuzzed(2), index, FUZZED)])
    mapping = client.indices.get_mapping(index=index)[index]["mappings"]
    assert {f: spec["type"] for f, spec in mapping["properties"].items()} == {**OLD_FIELDS} | dict.fromkeys(
        ADDED, "float"
    )
    assert mapping["_meta"]["neurolight_sae"]["scorers"] == ["simulation", "detection", "fuzzing"]
    assert mapping["_meta"]["neurolight_sae"]["d_sae"] == 44032
    assert without_time(writer.documents()) == [
        expected_document(1, index) | {"detection_auroc": None, "fuzzing_score": None, "fuzzing_auroc": None},
        expected_document(2, index, 2)
        | {"detection_score": None, "detection_auroc": None, "fuzzing_score": 0.75, "fuzzing_auroc": 0.875},
    ]
    writer.close()


def test_stores__a_reader_never_creates_what_it_does_not_find(tmp_path, es_address):
    index = sae_index_name({**META, "layer_id": 8})
    with pytest.raises(LatentStoreError, match=r"no SQLite store at .*none\.sqlite; interpret the latents first"):
        SQLiteStore(str(tmp_path / "none.sqlite")).open(index, META, create=False)
    assert not (tmp_path / "none.sqlite").exists()
    other = SQLiteStore(str(tmp_path / "other.sqlite"))
    other.open("another-sae", META)
    other.close()
    with pytest.raises(LatentStoreError, match=f"holds no SAE '{index}'; interpret its latents first"):
        SQLiteStore(str(tmp_path / "other.sqlite")).open(index, META, create=False)
    with pytest.raises(LatentStoreError, match=f"has no index '{index}': interpret the SAE's latents first"):
        ElasticsearchStore(es_address, api_key_env=None).open(index, META, create=False)
    assert not Elasticsearch(es_address).indices.exists(index=index)
