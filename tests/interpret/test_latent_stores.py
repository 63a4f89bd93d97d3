"""Latent stores and the InterpretationWriter against a real Elasticsearch-compatible server (noida-db on
loopback, the ``es_address`` fixture) and SQLite; failures are injected by a loopback proxy, never by mocking the
client. Over https: test_elasticsearch_tls.py."""

from __future__ import annotations

import logging
import math
import time

import lightning.pytorch as pl
import pytest
import torch
from elasticsearch import Elasticsearch
from torch.utils.data import DataLoader

from neurolight.callbacks.interpret.interpretation_writer import InterpretationWriter
from neurolight.callbacks.interpret.stores import (
    LEGACY_SCORERS,
    LatentStoreError,
    SQLiteStore,
    field_types,
    sae_index_name,
    to_document,
)
from neurolight.callbacks.interpret.stores.elasticsearch import ElasticsearchStore
from neurolight.datamodules.interpret.samples import KINDS, InterpretationSamples, save_interpretation_samples
from tests.helpers.noida import FaultProxy, free_port
from tests.helpers.store_documents import META, SECRET, expected_document, interpretation, without_time


def test_sae_index_name__spells_model_layer_sizes_lr_and_l1_like_the_run_names():
    assert sae_index_name(META) == "codellama-7b-instruct-hf_mlp_activations_l19_11008x44032_lr2e-4_spar0.5_relu"
    odd = {**META, "model_name": "/home/u/Models/My Model#2/", "learning_rate": 3.2e-5, "architecture": None}
    assert sae_index_name(odd) == "my-model-2_mlp_activations_l19_11008x44032_lr3.2e-5_spar0.5"
    with pytest.raises(ValueError, match=r"lacks \['d_sae'\]"):
        sae_index_name({key: value for key, value in META.items() if key != "d_sae"})


def test_elasticsearch_store__creates_index_with_explicit_mapping_and_round_trips_documents(es_address):
    index = sae_index_name({**META, "layer_id": 1})
    store = ElasticsearchStore(es_address, api_key_env=None)
    store.open(index, {**META, "layer_id": 1})
    store.upsert([to_document(interpretation(latent), index, META) for latent in (12, 3, 5, 0)])

    mapping = Elasticsearch(es_address).indices.get_mapping(index=index)[index]["mappings"]
    assert {field: spec["type"] for field, spec in mapping["properties"].items()} == field_types(LEGACY_SCORERS)
    assert mapping["_meta"]["neurolight_sae"]["d_sae"] == 44032
    assert mapping["_meta"]["neurolight_sae"]["scorers"] == ["simulation", "detection"]
    documents = store.documents()
    assert without_time(documents) == [expected_document(latent, index) for latent in (0, 3, 5, 12)]
    assert all(doc["updated_at"].endswith("+00:00") for doc in documents)
    assert store.stored_latents() == {0, 3, 5, 12}
    store.close()


def test_elasticsearch_store__rerun_of_the_same_upsert_updates_instead_of_failing(es_address):
    index = sae_index_name({**META, "layer_id": 2})
    store = ElasticsearchStore(es_address, api_key_env=None)
    store.open(index, META)
    store.upsert([to_document(interpretation(latent), index, META) for latent in range(4)])
    store.close()
    store.open(index, META)  # a second run opens the existing index
    store.upsert([to_document(interpretation(latent, version=2), index, META) for latent in range(1, 6)])

    client = Elasticsearch(es_address)
    client.indices.refresh(index=index)
    assert client.count(index=index)["count"] == 6
    versions = [1, 2, 2, 2, 2, 2]
    assert without_time(store.documents()) == [
        expected_document(latent, index, version) for latent, version in zip(range(6), versions)
    ]
    assert client.get(index=index, id="3")["_version"] == 2  # the id is the latent: replaced, not duplicated


def test_sqlite_store__round_trips_documents_and_upserts_by_sae_and_latent(tmp_path):
    path = tmp_path / "db" / "interpretations.sqlite"
    store, other = SQLiteStore(str(path)), SQLiteStore(str(path))
    index, other_index = sae_index_name(META), sae_index_name({**META, "layer_id": 3})
    store.open(index, META)
    other.open(other_index, META)
    store.upsert([to_document(interpretation(latent), index, META) for latent in (7, 0, 3)])
    other.upsert([to_document(interpretation(9), other_index, META)])
    store.upsert([to_document(interpretation(latent, version=2), index, META) for latent in (3, 4)])

    versions = {0: 1, 3: 2, 4: 2, 7: 1}
    assert without_time(store.documents()) == [expected_document(k, index, v) for k, v in versions.items()]
    assert store.stored_latents() == {0, 3, 4, 7}
    assert without_time(other.documents()) == [expected_document(9, other_index)]
    store.close()
    other.close()


def test_stores__refuse_an_index_that_holds_another_sae(tmp_path, es_address):
    first, second = (
        {**META, "sae_fingerprint": "aaaa", "sae_checkpoint": "step_5000.ckpt"},
        {**META, "sae_fingerprint": "bbbb"},
    )
    index = sae_index_name(META)
    for make in (lambda: SQLiteStore(str(tmp_path / "s.sqlite")), lambda: ElasticsearchStore(es_address)):
        store = make()
        store.open(index, first)
        store.upsert([to_document(interpretation(1), index, first)])
        store.close()
        store.open(index, first)  # the same SAE again: a rerun
        store.close()
        with pytest.raises(LatentStoreError, match=r"another SAE \(step_5000\.ckpt, fingerprint aaaa\).*bbbb"):
            store.open(index, second)
        store.close()


def test_elasticsearch_store__retries_503_with_backoff_and_sends_version_8_compatible_headers(es_address):
    index = sae_index_name({**META, "layer_id": 4})
    with FaultProxy(es_address, fail_status=503, fail_next=1) as proxy:
        store = ElasticsearchStore(proxy.address, api_key_env=None, max_retries=3, retry_backoff=0.1)
        store.open(index, META)
        assert proxy.failed == 1
        proxy.fail_next = 2
        start = time.perf_counter()
        store.upsert([to_document(interpretation(1), index, META)])
        assert proxy.failed == 3
        assert time.perf_counter() - start >= 0.05 + 0.1  # at least half of 0.1 * 2^attempt before each retry
        proxy.fail_next = 2
        store.upsert([to_document(interpretation(2), index, META)])
        assert proxy.failed == 5
        assert store.stored_latents() == {1, 2}
        assert {h["accept"] for _, _, h in proxy.requests} == {"application/vnd.elasticsearch+json; compatible-with=8"}

        proxy.reject_bulk_next = 2  # a busy cluster rejects the items (429 inside a 200): sent again
        store.upsert([to_document(interpretation(latent), index, META) for latent in (3, 4)])
        assert proxy.reject_bulk_next == 0 and store.stored_latents() == {1, 2, 3, 4}

        proxy.fail_next = 10
        with pytest.raises(LatentStoreError) as error:
            store.upsert([to_document(interpretation(5), index, META)])
        assert proxy.failed == 5 + 4  # the first try and three retries
        assert str(error.value) == (
            f"Elasticsearch at {proxy.address}, storing 1 latents in '{index}' (after 3 retries): "
            "503 unavailable_shards_exception: injected failure 9"
        )


def test_elasticsearch_store__wrong_api_key_is_one_line_error_and_the_key_is_never_shown(caplog, capsys):
    caplog.set_level(logging.DEBUG)
    with FaultProxy(None, fail_status=401) as proxy:
        store = ElasticsearchStore(proxy.address, api_key=SECRET, max_retries=3, retry_backoff=0.01)
        with pytest.raises(LatentStoreError) as error:
            store.open("some-index", META)
    message = str(error.value)
    assert message.startswith(f"Elasticsearch at {proxy.address}") and "\n" not in message
    assert "401 unauthorized: the API key was rejected; check api_key or $ES_API_KEY" in message
    assert len(proxy.requests) == 1  # an auth failure is not retried
    assert proxy.requests[0][2]["authorization"] == f"ApiKey {SECRET}"  # the key was sent...
    captured = capsys.readouterr()
    for text in (message, repr(store), caplog.text, captured.out, captured.err):  # ...and appears nowhere else
        assert SECRET not in text
    assert "**********" in repr(store)


def test_elasticsearch_store__reads_the_key_from_the_environment_and_configs_save_it_masked(monkeypatch):
    from jsonargparse import ArgumentParser

    monkeypatch.setenv("ES_API_KEY", SECRET)
    with FaultProxy(None, fail_status=401) as proxy:
        with pytest.raises(LatentStoreError, match="was rejected"):
            ElasticsearchStore(proxy.address, max_retries=0).open("some-index", META)
    assert proxy.requests[0][2]["authorization"] == f"ApiKey {SECRET}"

    # What LightningCLI writes to config.yaml: the parsed config of the callback and its store.
    parser = ArgumentParser()
    parser.add_class_arguments(InterpretationWriter, "writer")
    store = {"class_path": "neurolight.callbacks.interpret.stores.elasticsearch.ElasticsearchStore"}
    store["init_args"] = {"server_address": "https://es.example.org:9200", "api_key": SECRET}
    dumped = parser.dump(parser.parse_object({"writer": {"store": store}}))
    assert SECRET not in dumped and "api_key: '**********'" in dumped


def test_elasticsearch_store__unreachable_server_is_one_line_error_naming_the_address():
    address = f"http://127.0.0.1:{free_port()}"
    store = ElasticsearchStore(address, api_key=SECRET, max_retries=2, retry_backoff=0.01)
    with pytest.raises(LatentStoreError) as error:
        store.open("some-index", META)
    message = str(error.value)
    assert "\n" not in message and SECRET not in message
    assert message == (
        f"Elasticsearch at {address}, checking index 'some-index' (after 2 retries): cannot connect ([Errno 111] "
        "Connection refused): check server_address and that the server is running and reachable from this machine"
    )
    with pytest.raises(ValueError, match=r"needs a scheme: https://127.0.0.1:1234"):
        ElasticsearchStore("127.0.0.1:1234")


# ---- the writer in real predict runs ----------------------------------------------------------------------------

LATENTS = [2, 3, 5, 8, 11, 13, 21, 34, 40, 55]


def write_samples(path, model_name: str) -> InterpretationSamples:
    latents, slots, tokens = len(LATENTS), 2, 6
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "latents": torch.tensor(LATENTS),
        "frequency": torch.rand(64, generator=generator, dtype=torch.float64) / 100,
        "max_activation": torch.rand(latents, generator=generator) * 5,
        "contexts": torch.randint(3, 250, (4, tokens), generator=generator),
        "context_index": torch.arange(4) * 10,
    }
    for kind in KINDS:
        tensors[f"{kind}_context"] = torch.randint(0, 4, (latents, slots), generator=generator)
        tensors[f"{kind}_activations"] = torch.rand(latents, slots, tokens, generator=generator)
    save_interpretation_samples(path, tensors, {**META, "model_name": model_name, "d_sae": 64})
    return InterpretationSamples(path)


class LatentsDataModule(pl.LightningDataModule):
    """The datamodule contract of InterpretationDataModule: ``.samples`` after setup, ``skip_latents``."""

    def __init__(self, samples_path, max_latents: int | None = None) -> None:
        super().__init__()
        self.samples_path, self.samples, self.skipped, self.max_latents = samples_path, None, [], max_latents

    def setup(self, stage: str) -> None:
        self.samples = InterpretationSamples(self.samples_path)

    def skip_latents(self, latents) -> None:
        self.skipped = sorted(latents)

    def pending_latents(self) -> list[int]:
        return [latent for latent in self.samples.latents.tolist()[: self.max_latents] if latent not in self.skipped]

    def predict_dataloader(self):
        return DataLoader(self.pending_latents(), batch_size=3, collate_fn=list)


class FakeInterpreter(pl.LightningModule):
    """Returns ``interpretation(latent)`` for each latent; raises at batch ``kill_at`` (a killed run)."""

    scorer_names = ("simulation", "detection")

    def __init__(self, kill_at: int | None = None, on_batch=None, explainer_is_rank: bool = False) -> None:
        super().__init__()
        self.kill_at, self.on_batch, self.explainer_is_rank, self.seen = kill_at, on_batch, explainer_is_rank, []

    def predict_step(self, batch, batch_idx):
        if batch_idx == self.kill_at:
            raise RuntimeError("killed")
        if self.on_batch:
            self.on_batch(batch_idx)
        self.seen += batch
        explainer = {"explainer": f"rank{self.global_rank}"} if self.explainer_is_rank else {}
        return [interpretation(latent) | explainer for latent in batch]


def predict(
    tmp_path, store, module, trainer_args=(), max_latents=None, **writer_args
) -> tuple[InterpretationWriter, LatentsDataModule]:
    writer = InterpretationWriter(store, **writer_args)
    datamodule = LatentsDataModule(tmp_path / "samples", max_latents)
    trainer = pl.Trainer(
        **dict(trainer_args),
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
        default_root_dir=tmp_path,
    )
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return writer, datamodule


@pytest.mark.parametrize("backend", ["sqlite", "elasticsearch"])
def test_writer__killed_run_resumes_skipping_stored_latents_and_stores_each_latent_once(
    backend, tmp_path, es_address, capsys
):
    write_samples(tmp_path / "samples", model_name=f"tiny-{backend}")
    index = sae_index_name({**META, "model_name": f"tiny-{backend}", "d_sae": 64})

    def make_store():
        if backend == "sqlite":
            return SQLiteStore(str(tmp_path / "latents.sqlite"))
        return ElasticsearchStore(es_address, api_key_env=None)

    with pytest.raises(RuntimeError, match="killed"):
        predict(tmp_path, make_store(), FakeInterpreter(kill_at=2))
    check = make_store()
    check.open(index, META)
    assert check.stored_latents() == set(LATENTS[:6])  # the two finished batches were kept

    resumed = FakeInterpreter()
    writer, datamodule = predict(tmp_path, make_store(), resumed)
    assert datamodule.skipped == LATENTS[:6] and writer.skipped == 6
    assert resumed.seen == LATENTS[6:]
    assert without_time(check.documents()) == [
        expected_document(k, index) | {"model": f"tiny-{backend}"} for k in LATENTS
    ]
    scores = [s for k in LATENTS if not math.isnan(s := interpretation(k)["score"])]
    summary = capsys.readouterr().out
    assert "interpreted 4 latents (4 stored), skipped 6 already stored" in summary
    assert f"holds 10 latents, mean score {sum(scores) / len(scores):.3f} ({len(scores)} scored, chance 0)" in summary
    areas = [interpretation(k)["detection_auroc"] for k in LATENTS]
    assert f", mean detection AUROC {sum(areas) / len(areas):.3f} (10 scored, chance 0.5)" in summary

    again = FakeInterpreter()
    writer, _ = predict(tmp_path, make_store(), again)
    assert again.seen == [] and writer.skipped == 10
    assert "interpreted 0 latents (0 stored), skipped 10 already stored" in capsys.readouterr().out
    assert len(check.documents()) == 10
    check.close()


def test_writer__batches_the_store_refuses_go_to_a_fallback_file_the_next_run_uploads(tmp_path, es_address, caplog):
    write_samples(tmp_path / "samples", model_name="tiny-fallback")
    index = sae_index_name({**META, "model_name": "tiny-fallback", "d_sae": 64})
    with FaultProxy(es_address, fail_status=503) as proxy:

        def server_goes_down(batch_idx: int) -> None:
            if batch_idx == 1:
                proxy.fail_next = 1000

        store = ElasticsearchStore(proxy.address, api_key_env=None, max_retries=1, retry_backoff=0.01)
        writer = InterpretationWriter(store, fallback_dir=str(tmp_path))
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[writer], default_root_dir=tmp_path,
        )  # fmt: skip
        # The run fails its job: it says how many latents wait where, and that a rerun uploads them.
        with pytest.raises(LatentStoreError, match=r"^7 interpreted latents could not be stored and wait in .*rerun"):
            trainer.predict(
                FakeInterpreter(on_batch=server_goes_down), datamodule=LatentsDataModule(tmp_path / "samples"),
                return_predictions=False,
            )  # fmt: skip
    assert writer.written == LATENTS[:3] and writer.unstored == LATENTS[3:]
    fallback = tmp_path / f"{index}.unstored.rank0.jsonl"
    assert len(fallback.read_text().splitlines()) == 7
    assert f"kept latents [8, 11, 13] in {fallback}" in caplog.text

    rerun = FakeInterpreter()
    writer, _ = predict(tmp_path, ElasticsearchStore(es_address, api_key_env=None), rerun, fallback_dir=str(tmp_path))
    assert rerun.seen == [] and writer.skipped == 10 and not fallback.exists()
    check = ElasticsearchStore(es_address, api_key_env=None)
    check.open(index, META)
    assert [doc["latent"] for doc in check.documents()] == LATENTS
    check.close()


def test_writer__writes_the_feature_browser_of_every_stored_latent(tmp_path, tiny_model_dir):
    pytest.importorskip("neurolight.callbacks.interpret.feature_browser")
    write_samples(tmp_path / "samples", model_name=str(tiny_model_dir))
    browser = tmp_path / "browser.html"
    writer, _ = predict(
        tmp_path, SQLiteStore(str(tmp_path / "latents.sqlite")), FakeInterpreter(), browser_path=str(browser)
    )
    assert writer.browser == browser and browser.is_file()
    html = browser.read_text()
    assert all(interpretation(latent)["explanation"] in html for latent in LATENTS)


def test_writer__rerun_with_nothing_left_of_max_latents_still_reports_and_writes_the_browser(
    tmp_path, tiny_model_dir, capsys
):
    write_samples(tmp_path / "samples", model_name=str(tiny_model_dir))
    store = SQLiteStore(str(tmp_path / "latents.sqlite"))
    predict(tmp_path, store, FakeInterpreter(), max_latents=4)
    browser = tmp_path / "browser.html"
    rerun = FakeInterpreter()
    writer, _ = predict(tmp_path, store, rerun, max_latents=4, browser_path=str(browser))
    assert rerun.seen == [] and writer.skipped == 4 and writer.browser == browser and browser.is_file()
    assert "skipped 4 already stored" in capsys.readouterr().out.split("feature browser")[-2]


# DDP: two spawned processes each import Lightning (~20-50 s on 2 shared cores)
@pytest.mark.usefixtures("one_torch_thread")
def test_writer__under_ddp_each_rank_stores_its_own_latents_and_every_latent_once(tmp_path, es_address, capfd):
    write_samples(tmp_path / "samples", model_name="tiny-ddp")
    index = sae_index_name({**META, "model_name": "tiny-ddp", "d_sae": 64})
    store = ElasticsearchStore(es_address, api_key_env=None)
    store.open(index, META)
    store.upsert(
        [to_document(interpretation(latent) | {"explainer": "earlier run"}, index, META) for latent in LATENTS[:4]]
    )

    ddp = {"strategy": "ddp_spawn", "devices": 2}
    interpreter = FakeInterpreter(explainer_is_rank=True)
    predict(tmp_path, ElasticsearchStore(es_address, api_key_env=None), interpreter, ddp)
    documents = store.documents()
    assert [doc["latent"] for doc in documents] == LATENTS
    explainers = [doc["explainer"] for doc in documents]
    assert explainers[:4] == ["earlier run"] * 4  # stored latents were skipped on both ranks
    assert sorted(explainers[4:]) == ["rank0"] * 3 + ["rank1"] * 3
    assert "interpreted 6 latents (6 stored), skipped 4 already stored" in capfd.readouterr().out
    store.close()


def test_samples__a_truncated_tensor_file_is_named_with_the_fix(tmp_path):
    path = write_samples(tmp_path / "samples", model_name="tiny").path
    tensors = path / "samples.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"samples\.safetensors is truncated or corrupted .*sample\.yaml"):
        InterpretationSamples(path)


def test_sqlite__a_full_disk_is_a_store_error_naming_the_file_and_the_batch_is_not_half_written(tmp_path):
    index = sae_index_name(META)
    store = SQLiteStore(str(tmp_path / "latents.sqlite"))
    store.open(index, META)
    store.upsert([to_document(interpretation(LATENTS[0]), index, META)])
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 1}")  # the disk fills at the next page or so
    big = [to_document({**interpretation(k), "explanation": "x" * 20_000}, index, META) for k in LATENTS[1:]]
    with pytest.raises(LatentStoreError, match=r"SQLite store .*latents\.sqlite refused a write \(database or disk"):
        store.upsert(big)
    assert store.stored_latents() == {LATENTS[0]}
    store.close()
