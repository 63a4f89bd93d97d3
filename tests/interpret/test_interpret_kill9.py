"""The interpretation jobs killed with SIGKILL at a seeded random batch (``tests.helpers.kill9``) and rerun with the
same command end as an uninterrupted run does: the latent sampler continues from its ``.resume`` snapshot and writes
the same ``samples.safetensors``, byte for byte (a second run on its held folder is refused in one line); the
interpreter skips the latents already stored and leaves the same documents, each latent once, in SQLite and in
Elasticsearch (noida-db)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from neurolight.callbacks.interpret.stores import SQLiteStore
from neurolight.callbacks.interpret.stores.elasticsearch import ElasticsearchStore
from neurolight.cli.main import main as neurolight
from tests.helpers.kill9 import (
    kill9,
    kill_9_after_a_second_run_is_refused,
    kill_batch,
    start_until_stopped,
    write_recipe,
)
from tests.helpers.recipes import (
    SAMPLER_BATCH,
    SAMPLER_FREQUENCY_CONTEXTS,
    SAMPLER_NUM_SAMPLES,
    elasticsearch_store,
    interpret_recipe,
    sample_recipe,
    sqlite_store,
)
from tests.helpers.sae import build_sampler_sae

LATENTS = 6  # interpreted, one a batch


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed processes (tests.helpers.kill9)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sampler_inputs(tmp_path_factory, tiny_model_dir, one_thread) -> tuple[Path, Path, Path]:
    """``(folder, corpus, SAE checkpoint)``: a tiny TopK SAE trained for 4 steps and its corpus."""
    root, corpus, checkpoint = build_sampler_sae(tmp_path_factory.mktemp("interpret-kill9"), tiny_model_dir)
    return root, corpus, checkpoint


@pytest.fixture(scope="module")
def reference_samples(sampler_inputs) -> Path:
    """The samples of an uninterrupted sampler run (the interpretation tests read them too)."""
    root, corpus, checkpoint = sampler_inputs
    samples = root / "reference" / "samples"
    config = write_recipe(root / "reference.yaml", sample_recipe(samples, checkpoint, corpus))
    neurolight(["predict", "--config", str(config)])
    assert sorted(p.name for p in samples.iterdir()) == [".neurolight.lock", "metadata.json", "samples.safetensors"]
    return samples


def test_sampling__killed_and_rerun_writes_the_samples_of_an_uninterrupted_run(
    sampler_inputs, reference_samples, one_thread, capsys
):
    root, corpus, checkpoint = sampler_inputs
    samples = root / "killed" / "samples"
    config = write_recipe(root / "killed.yaml", sample_recipe(samples, checkpoint, corpus))
    batches = (SAMPLER_FREQUENCY_CONTEXTS + SAMPLER_NUM_SAMPLES) // SAMPLER_BATCH
    stop = kill_batch("sample", 4, batches)  # after the first snapshot (2 batches), before the last batch
    kill_9_after_a_second_run_is_refused(["predict", "--config", str(config)], stop, root / "killed.log", samples)
    assert sorted(p.name for p in samples.iterdir()) == [".neurolight.lock", ".resume"], f"batch {stop}"
    assert [p.name for p in (samples / ".resume").iterdir()] == ["rank0.pt"]

    capsys.readouterr()
    neurolight(["predict", "--config", str(config)])
    done = (stop - 1) // 2 * 2 * SAMPLER_BATCH  # contexts in the newest snapshot
    step, at = (0, done) if done <= SAMPLER_FREQUENCY_CONTEXTS else (1, done - SAMPLER_FREQUENCY_CONTEXTS)
    assert f"resuming pass {step} ({('frequency', 'sampling')[step]}) at context {at} of " in capsys.readouterr().out
    assert sorted(p.name for p in samples.iterdir()) == [".neurolight.lock", "metadata.json", "samples.safetensors"]
    for name in ("samples.safetensors", "metadata.json"):
        assert (samples / name).read_bytes() == (reference_samples / name).read_bytes(), f"{name}, batch {stop}"


def documents(store) -> list[dict]:
    """The store's documents without what names the run (index) or its time."""
    return [{k: v for k, v in doc.items() if k not in ("sae", "updated_at")} for doc in store.documents()]


def interpret_killed_and_reference(root: Path, samples: Path, make_store, job: str, capsys) -> tuple:
    """Runs the interpreter killed before a seeded batch and rerun, and uninterrupted; returns both stores."""
    stores = {}
    stop = kill_batch(job, 2, LATENTS)  # after at least one stored latent, before the last
    for name in ("killed", "reference"):
        store, config_store = make_store(name)
        recipe = interpret_recipe(root / name, samples, config_store, name, LATENTS)
        config = write_recipe(root / f"{job}-{name}.yaml", recipe)
        if name == "killed":
            kill9(start_until_stopped(["predict", "--config", str(config)], stop, root / f"{job}-killed.log"))
            store.open(name, {}, create=False)
            assert len(store.stored_latents()) == stop - 1  # the batches done before the kill, each stored
            store.close()
            capsys.readouterr()
        neurolight(["predict", "--config", str(config)])
        if name == "killed":
            summary = re.search(r"interpreted (\d+) latents \((\d+) stored\), skipped (\d+)", capsys.readouterr().out)
            assert summary and summary.groups() == (str(LATENTS - stop + 1),) * 2 + (str(stop - 1),), summary
        store.open(name, {}, create=False)
        stores[name] = store
    return stores["killed"], stores["reference"], stop


def test_interpretation__killed_and_rerun_stores_each_latent_once_like_an_uninterrupted_run__sqlite(
    sampler_inputs, reference_samples, one_thread, capsys
):
    root = sampler_inputs[0] / "sqlite"

    def make_store(name):
        path = root / f"{name}.sqlite"
        return SQLiteStore(str(path)), sqlite_store(path)

    killed, reference, stop = interpret_killed_and_reference(root, reference_samples, make_store, "sqlite", capsys)
    got, want = documents(killed), documents(reference)
    assert len(want) == LATENTS and [doc["latent"] for doc in got] == [doc["latent"] for doc in want]
    assert got == want, f"killed before batch {stop}"


def test_interpretation__killed_and_rerun_stores_each_latent_once_like_an_uninterrupted_run__elasticsearch(
    sampler_inputs, reference_samples, es_address, one_thread, capsys
):
    root = sampler_inputs[0] / "elasticsearch"

    def make_store(name):
        return ElasticsearchStore(es_address, api_key_env=None), elasticsearch_store(es_address)

    killed, reference, stop = interpret_killed_and_reference(root, reference_samples, make_store, "es", capsys)
    got, want = documents(killed), documents(reference)
    assert len(want) == LATENTS and [doc["latent"] for doc in got] == [doc["latent"] for doc in want]
    assert got == want, f"killed before batch {stop}"
