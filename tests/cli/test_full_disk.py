"""A full disk (a small tmpfs, ``tests.helpers.full_disk``) under each writer of the suite: the run fails with one
line that names the file it could not write, and leaves no partial file under a real name (what is there is whole:
an earlier checkpoint, snapshot or batch), nor a temporary file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from neurolight.cli.main import main as neurolight
from neurolight.cli.tokenize import main as neurolight_tokenize
from tests.conftest import make_sentences
from tests.helpers.full_disk import files, small_tmpfs
from tests.helpers.kill9 import write_recipe
from tests.helpers.recipes import SAMPLER_BATCH, interpret_recipe, sample_recipe, send_recipe, sqlite_store
from tests.helpers.sae import build_sampler_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PAGE = 4096
CONTEXTS, CONTEXT_LENGTH = 1024, 32  # a shard: 1024 x 32 int32 = 128 KiB + the .npy header: 33 pages
SHARD_PAGES = 33


def fill_disk(folder: Path, before_batch: int) -> dict:
    return {"class_path": "tests.helpers.full_disk.FillDisk",
            "init_args": {"folder": str(folder), "before_batch": before_batch}}  # fmt: skip


def failure(args: list[str], command=neurolight) -> str:
    """The run's error: one line."""
    with pytest.raises(SystemExit) as error:
        command(args)
    message = str(error.value.code)
    assert "\n" not in message, message
    return message


# ---- neurolight-tokenize ----------------------------------------------------------------------------------------


def tokenize(tmp_path: Path, output: Path, tokenizer: Path) -> list[str]:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_sentences(2600, seed=3, min_words=40)))
    sizes = ["--min_tokens", str(CONTEXT_LENGTH), "--num_files", "2", "--num_samples_per_file", str(CONTEXTS)]
    return ["--output_dir", str(output), "--tokenizer", str(tokenizer), "--data_files", str(docs), *sizes]


def test_tokenizer__a_shard_that_does_not_fit_fails_naming_it_and_leaves_no_shard(tmp_path, tiny_model_dir):
    with small_tmpfs(tmp_path / "disk", (SHARD_PAGES + 16) * PAGE) as disk:  # the first shard fits, the second does not
        message = failure(tokenize(tmp_path, disk / "corpus", tiny_model_dir), neurolight_tokenize)
        assert files(disk) == []  # the first shard is removed too: a partial set of shards would look usable
        shard = disk / "corpus" / "shard_00001.npy"
        assert message.startswith(f"neurolight-tokenize: error: could not write the shard (131,072 bytes) {shard} (")
        assert message.endswith(f"free space on, or fix the permissions of, {disk / 'corpus'} and run again")


def test_tokenizer__metadata_that_does_not_fit_fails_naming_it_and_leaves_no_partial_file(tmp_path, tiny_model_dir):
    with small_tmpfs(tmp_path / "disk", 2 * SHARD_PAGES * PAGE) as disk:  # both shards fit, metadata.json does not
        message = failure(tokenize(tmp_path, disk / "corpus", tiny_model_dir), neurolight_tokenize)
        left = files(disk)
        assert "metadata.json" not in " ".join(left), left  # nor its temporary file
        for shard in left:  # whole shards, which without metadata.json are an unfinished build
            assert np.load(disk / shard).shape == (CONTEXTS, CONTEXT_LENGTH)
        assert str(disk / "corpus" / "metadata.json") in message and "No space left on device" in message


# ---- ResumableCheckpoint (SEND) ---------------------------------------------------------------------------------


def test_send_checkpoint__a_full_disk_fails_naming_last_ckpt_and_keeps_the_previous_one_whole(
    tmp_path, tiny_model_dir, records_path
):
    with small_tmpfs(tmp_path / "disk", 32 << 20) as disk:
        recipe = send_recipe(tmp_path / "run", tiny_model_dir, records_path, checkpoints=disk / "checkpoints")
        recipe["trainer"]["callbacks"].append(fill_disk(disk, before_batch=4))  # in epoch 2: its last.ckpt fails
        message = failure(["fit", "--config", str(write_recipe(tmp_path / "send.yaml", recipe))])
        assert files(disk) == ["checkpoints/last.ckpt"]
        assert torch.load(disk / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0  # epoch 1's, whole
        assert str(disk / "checkpoints" / "last.ckpt") in message and "No space left on device" in message, message


# ---- InterpretationSamplesWriter ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler_inputs(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, Path]:
    return build_sampler_sae(tmp_path_factory.mktemp("full-disk"), tiny_model_dir)


@pytest.mark.parametrize("write", ["samples", "snapshot"])
def test_samples__a_full_disk_fails_naming_the_file_and_leaves_no_partial_file(write, sampler_inputs, tmp_path):
    _, corpus, checkpoint = sampler_inputs
    with small_tmpfs(tmp_path / "disk", 4 << 20) as disk:
        if write == "samples":  # no snapshots; the disk fills before the last batch, so the final write fails
            snapshot_every_n_contexts, fill_before, name = None, 16, "samples.safetensors"
        else:  # a snapshot every 2 batches: the one after batch 4 fails, the one after batch 2 is kept
            snapshot_every_n_contexts, fill_before, name = 2 * SAMPLER_BATCH, 3, ".resume/rank0.pt"
        recipe = sample_recipe(disk / "samples", checkpoint, corpus, snapshot_every_n_contexts)
        recipe["trainer"]["callbacks"].append(fill_disk(disk, fill_before))
        message = failure(["predict", "--config", str(write_recipe(tmp_path / "sample.yaml", recipe))])
        if write == "samples":
            assert files(disk / "samples") == []
        else:
            assert files(disk / "samples") == [".resume/rank0.pt"]
            snapshot = torch.load(disk / "samples" / ".resume" / "rank0.pt", weights_only=True)
            assert snapshot["contexts_done"].tolist() == [2 * SAMPLER_BATCH, 0]
        assert str(disk / "samples" / name) in message and "No space left on device" in message, message


# ---- SQLiteStore -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(sampler_inputs) -> Path:
    root, corpus, checkpoint = sampler_inputs
    path = root / "samples"
    config = write_recipe(root / "sample.yaml", sample_recipe(path, checkpoint, corpus))
    neurolight(["predict", "--config", str(config)])
    return path


def test_sqlite_store__a_full_disk_fails_naming_the_file_and_keeps_the_whole_batches_stored_before(samples, tmp_path):
    with small_tmpfs(tmp_path / "disk", 4 << 20) as disk:
        store = disk / "interpretations.sqlite"
        recipe = interpret_recipe(disk, samples, sqlite_store(store), "full-disk", max_latents=5)
        recipe["trainer"]["callbacks"].append(fill_disk(disk, before_batch=3))  # latents 3-5 find the disk full
        message = failure(["predict", "--config", str(write_recipe(tmp_path / "interpret.yaml", recipe))])
        with sqlite3.connect(store) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert db.execute("SELECT count(*) FROM latents").fetchone() == (2,)  # the two batches before
        for name in files(disk):  # a fallback file, if any, holds whole documents
            if name.endswith(".jsonl"):
                assert all(json.loads(line) for line in (disk / name).read_text().splitlines())
        assert f"SQLite store {store} refused a write (database or disk is full)" in message, message
        assert f"be kept in {disk / 'full-disk.unstored.rank0.jsonl'} (No space left on device)" in message, message
