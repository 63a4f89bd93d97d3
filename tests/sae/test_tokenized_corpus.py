import json
import pickle

import numpy as np
import pytest
import torch

from neurolight.cli.tokenize import main
from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus, build_tokenized_corpus, iter_documents
from tests.conftest import make_sentences

BOS = 1  # "<s>" of the conftest tokenizer


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Documents of 1-6 short sentences (~20-300 tokens): some fall under min_tokens, most give several windows."""
    return [" ".join(make_sentences(1 + (5 * i) % 6, seed=1000 * seed + i, max_words=20)) for i in range(n)]


def expected_contexts(tokenizer, documents, min_tokens: int, context_length: int, bos: bool = True) -> list[list[int]]:
    """[BOS] + non-overlapping windows of each document long enough, tokenized one by one, filling context_length."""
    body = context_length - bos
    out = []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) >= max(min_tokens, body):
            out += [[BOS] * bos + ids[start : start + body] for start in range(0, len(ids) - body + 1, body)]
    return out


def write_jsonl(path, documents, field="text"):
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(documents)))
    return path


def read_shards(path, num_files):
    return [np.load(path / f"shard_{i:05d}.npy") for i in range(num_files)]


def test_build__shards_are_bos_windows_of_the_long_documents_in_order(tmp_path, tiny_model_dir, tiny_tokenizer):
    documents = make_documents(40)
    source = write_jsonl(tmp_path / "docs.jsonl", documents, field="body")
    out = build_tokenized_corpus(
        tmp_path / "corpus", tokenizer=str(tiny_model_dir), data_files=[str(source)], text_field="body",
        min_tokens=64, context_length=32, num_files=3, num_samples_per_file=50, seed=None,
    )  # fmt: skip
    shards = read_shards(out, 3)
    assert all(s.shape == (50, 32) and s.dtype == np.int32 for s in shards)
    expected = expected_contexts(tiny_tokenizer, documents, min_tokens=64, context_length=32)
    assert len(expected) >= 150 > len(expected) - 40  # most of the corpus is needed, short documents included
    np.testing.assert_array_equal(np.concatenate(shards), np.array(expected[:150]))

    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["tokenizer"] == str(tiny_model_dir) and metadata["vocab_size"] == len(tiny_tokenizer)
    assert metadata["bos_token_id"] == BOS and metadata["context_length"] == 32 and metadata["min_tokens"] == 64
    assert (metadata["num_files"], metadata["num_samples_per_file"], metadata["num_contexts"]) == (3, 50, 150)
    assert metadata["dataset"] == {"data_files": [str(source)], "format": "json", "text_field": "body"}
    assert metadata["counts"]["contexts"] == 150 and metadata["counts"]["documents_too_short"] > 0
    assert metadata["shards"] == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]


def test_build__seed_shuffles_rows_within_each_shard_only(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(20))
    kwargs = dict(tokenizer=str(tiny_model_dir), data_files=str(source), min_tokens=32, num_files=2)
    ordered = read_shards(build_tokenized_corpus(tmp_path / "a", seed=None, num_samples_per_file=40, **kwargs), 2)
    shuffled = read_shards(build_tokenized_corpus(tmp_path / "b", seed=3, num_samples_per_file=40, **kwargs), 2)
    for a, b in zip(ordered, shuffled):
        assert not np.array_equal(a, b)
        np.testing.assert_array_equal(np.unique(a, axis=0), np.unique(b, axis=0))


def test_build__two_processes_take_alternate_documents_and_never_duplicate(tmp_path, tiny_model_dir, tiny_tokenizer):
    documents = make_documents(40)
    source = write_jsonl(tmp_path / "docs.jsonl", documents)
    out = build_tokenized_corpus(
        tmp_path / "corpus", tokenizer=str(tiny_model_dir), data_files=str(source), min_tokens=32,
        num_files=4, num_samples_per_file=30, num_processes=2, seed=None,
    )  # fmt: skip
    shards = read_shards(out, 4)
    rows = np.concatenate(shards)
    assert len(np.unique(rows, axis=0)) == len(rows) == 120
    for worker in range(2):  # worker w writes shards 2w, 2w+1 from documents with index % 2 == w
        mine = expected_contexts(tiny_tokenizer, documents[worker::2], min_tokens=32, context_length=32)
        np.testing.assert_array_equal(np.concatenate(shards[2 * worker : 2 * worker + 2]), np.array(mine[:60]))


def test_build__parquet_source_without_bos(tmp_path, tiny_model_dir, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    documents = make_documents(12)
    pq.write_table(pa.table({"text": documents}), tmp_path / "docs.parquet")
    out = build_tokenized_corpus(
        tmp_path / "corpus", tokenizer=str(tiny_model_dir), data_files=[str(tmp_path / "*.parquet")],
        min_tokens=16, context_length=16, prepend_bos=False, num_files=1, num_samples_per_file=20, seed=None,
    )  # fmt: skip
    expected = expected_contexts(tiny_tokenizer, documents, min_tokens=16, context_length=16, bos=False)
    np.testing.assert_array_equal(read_shards(out, 1)[0], np.array(expected[:20]))
    assert json.loads((out / "metadata.json").read_text())["bos_token_id"] is None


def test_iter_documents__text_files_split_at_blank_lines_and_pydoc_is_offline(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph,\nstill first.\n\nSecond one.\n")
    assert [d.strip() for d in iter_documents(data_files=str(tmp_path / "a.txt"))] == [
        "First paragraph,\nstill first.",
        "Second one.",
    ]
    pydoc = list(iter_documents("pydoc"))
    assert len(pydoc) > 50 and all(isinstance(d, str) and d.strip() for d in pydoc)
    assert sum(map(len, pydoc)) > 100_000


def test_build__corpus_too_small_says_produced_and_needed_and_leaves_no_shards(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(4))
    with pytest.raises(ValueError, match=r"ran out: \d+ contexts .* produced, but .* = 1000 needed.*Lower"):
        build_tokenized_corpus(
            tmp_path / "corpus", tokenizer=str(tiny_model_dir), data_files=str(source), min_tokens=32,
            num_files=2, num_samples_per_file=500,
        )  # fmt: skip
    assert not list((tmp_path / "corpus").iterdir())


def test_build__empty_corpus_is_an_error(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "docs.jsonl", ["", "   "])
    with pytest.raises(ValueError, match="no documents"):
        build_tokenized_corpus(tmp_path / "corpus", tokenizer=str(tiny_model_dir), data_files=str(source))


def test_build__rejects_bad_process_split_and_existing_output(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(10))
    kwargs = dict(tokenizer=str(tiny_model_dir), data_files=str(source), min_tokens=16, num_samples_per_file=10)
    with pytest.raises(ValueError, match="num_files=3 is not a multiple of num_processes=2"):
        build_tokenized_corpus(tmp_path / "a", num_files=3, num_processes=2, **kwargs)

    out = tmp_path / "b"
    out.mkdir()
    (out / "shard_00007.npy").write_bytes(b"stale")
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_tokenized_corpus(out, **kwargs)
    build_tokenized_corpus(out, overwrite=True, **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "notes.txt", "shard_00000.npy"]


def test_tokenized_corpus__reads_every_shard_row_by_index_and_in_batches(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(30))
    out = build_tokenized_corpus(
        tmp_path / "corpus", tokenizer=str(tiny_model_dir), data_files=str(source), min_tokens=24,
        num_files=3, num_samples_per_file=25,
    )  # fmt: skip
    rows = np.concatenate(read_shards(out, 3))
    corpus = TokenizedCorpus(out)
    assert len(corpus) == 75 and corpus.context_length == 24 and corpus.metadata["num_files"] == 3
    np.testing.assert_array_equal(corpus[30], rows[30])
    np.testing.assert_array_equal(corpus[-1], rows[74])
    indices = [74, 0, 26, 26, 51, -75]
    batch = corpus.batch(np.array(indices))
    assert batch.dtype == torch.long and batch.shape == (6, 24)
    torch.testing.assert_close(batch, torch.from_numpy(rows[indices]).long())
    torch.testing.assert_close(pickle.loads(pickle.dumps(corpus)).batch(indices), batch)
    with pytest.raises(IndexError, match="75 contexts"):
        corpus[75]

    (out / "shard_00001.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard_00001\.npy"):
        TokenizedCorpus(out)
    (out / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"metadata\.json is missing"):
        TokenizedCorpus(out)


def test_main__config_file_bare_overwrite_flag_and_documented_help(tmp_path, tiny_model_dir, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(10))
    config = tmp_path / "tokenize.yaml"
    config.write_text(f"tokenizer: {tiny_model_dir}\ndata_files: [{source}]\nmin_tokens: 16\nnum_samples_per_file: 8\n")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "old").write_text("x")
    main(["--config", str(config), "--output_dir", str(tmp_path / "corpus"), "--num_files", "2", "--overwrite"])
    assert "wrote 16 contexts of 16 tokens" in capsys.readouterr().out
    assert len(TokenizedCorpus(tmp_path / "corpus")) == 16

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for field in ("min_tokens", "context_length", "prepend_bos", "num_processes", "text_field", "overwrite"):
        assert f"--{field}" in help_text
    assert "index % num_processes == w" in help_text and "Documents with fewer tokens are skipped" in help_text


def _corpus(tmp_path, tiny_model_dir):
    return build_tokenized_corpus(
        output_dir=str(tmp_path / "corpus"), tokenizer=str(tiny_model_dir), dataset="pydoc", min_tokens=16,
        context_length=16, num_files=2, num_samples_per_file=8, num_processes=1,
    )  # fmt: skip


def test_open__a_truncated_shard_is_named_with_the_fix(tmp_path, tiny_model_dir):
    path = _corpus(tmp_path, tiny_model_dir)
    shard = path / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"shard .*shard_00001\.npy is truncated or corrupted .*neurolight-tokenize"):
        TokenizedCorpus(path)


def test_validate__token_ids_outside_the_vocabulary_name_the_shard(tmp_path, tiny_model_dir):
    path = _corpus(tmp_path, tiny_model_dir)
    corpus = TokenizedCorpus(path)
    corpus.validate(vocab_size=10**6)  # a clean corpus passes
    shard = np.load(path / "shard_00000.npy")
    shard[3, 5] = corpus.metadata["vocab_size"] + 7
    np.save(path / "shard_00000.npy", shard)
    with pytest.raises(ValueError, match=r"shard .*shard_00000\.npy holds token ids in \[\d+, \d+\], outside"):
        TokenizedCorpus(path).validate()


def test_save__a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from neurolight.datamodules.sae import tokenized_corpus

    def full_disk(file, array):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenized_corpus.np, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write the shard .*\(No space left on device\); free space"):
        tokenized_corpus._save_atomic(tmp_path / "shard_00000.npy", np.zeros((2, 4), dtype=np.int32))
    assert list(tmp_path.iterdir()) == []
