"""Tokenize a text corpus into fixed-length contexts stored as ``.npy`` shards, and read them back.

    neurolight-tokenize --output_dir runs/demo/corpus --tokenizer smollm2-135m --dataset pydoc \\
        --min_tokens 64 --context_length 64 --num_files 2 --num_samples_per_file 768 --num_processes 2 --overwrite

Parallel workers split the documents, so none produces another's samples: worker ``w`` tokenizes only the
documents with ``index % num_processes == w``.
An output directory holds ``shard_00000.npy``, ... (each ``(num_samples_per_file, context_length)``, one context
per row) and ``metadata.json``, written last: a directory without it is an unfinished build.
"""

from __future__ import annotations

import glob
import itertools
import json
import multiprocessing
import operator
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from neurolight.datamodules.files import atomic_path

PYDOC = "pydoc"
SHARD_NAME = "shard_{:05d}.npy"
METADATA_FILE = "metadata.json"
_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_TOKENIZE_BATCH = 64  # documents per tokenizer call: amortises Python overhead without holding much text


def _expand_data_files(data_files: str | Sequence[str]) -> tuple[list[str], str]:
    """Expand paths and globs; return the files and their single ``load_dataset`` builder name."""
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"data_files entry '{pattern}' matches no file")
        files.extend(matches)
    builders = set()
    for file in files:
        suffix = Path(file).suffix.lower()
        if suffix not in _FORMATS:
            raise ValueError(f"data file '{file}' has extension '{suffix}'; supported: {', '.join(_FORMATS)}")
        builders.add(_FORMATS[suffix])
    if len(builders) > 1:
        raise ValueError(f"data_files mix formats ({', '.join(sorted(builders))}); tokenize each format separately")
    return files, builders.pop()


def iter_documents(
    dataset: str = PYDOC,
    data_files: str | Sequence[str] | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
) -> Iterator[str]:
    """Yield the corpus's non-empty documents, always in the same order (the workers split it by index).

    The arguments mean what they mean for ``build_tokenized_corpus``.
    """
    if dataset == PYDOC and not data_files:
        from pydoc_data.topics import topics  # the standard library's help texts: offline and always present

        yield from (text for text in topics.values() if text.strip())
        return
    from datasets import load_dataset  # imported late: slow, and the pydoc source does not need it

    if data_files:
        files, builder = _expand_data_files(data_files)
        # A .txt file is split into documents at blank lines; line by line would make every document too short.
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        field = "text" if builder == "text" else text_field
        records = load_dataset(builder, data_files=files, split="train", streaming=True, **extra)
    else:
        field = text_field
        records = load_dataset(dataset, name=dataset_config, split=split, streaming=True)
    for record in records:
        if field not in record:
            raise ValueError(f"text_field '{field}' is not a field of the records; fields are: {', '.join(record)}")
        text = record[field]
        if isinstance(text, str) and text.strip():
            yield text


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, f"shard ({array.nbytes:,} bytes)") as temporary, open(temporary, "wb") as file:
        np.save(file, array)


@dataclass(frozen=True)
class _Job:
    """What one worker process needs; plain values, so it pickles for 'spawn'."""

    worker: int
    num_workers: int
    tokenizer_path: str
    source: dict
    output_dir: str
    num_shards: int  # this worker writes shards worker * num_shards ... (worker + 1) * num_shards - 1
    num_samples_per_file: int
    context_length: int
    min_tokens: int
    bos_token_id: int | None
    dtype: str
    seed: int | None


def _contexts(job: _Job, tokenizer, counts: dict[str, int]) -> Iterator[np.ndarray]:
    """Yield this worker's contexts, one ``(n, context_length)`` array per usable document; update ``counts``."""
    body = job.context_length - (job.bos_token_id is not None)  # document tokens per context
    threshold = max(job.min_tokens, body)  # a document too short for one window would be "used" for nothing
    mine = (doc for i, doc in enumerate(iter_documents(**job.source)) if i % job.num_workers == job.worker)
    for batch in _batched(mine, _TOKENIZE_BATCH):
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            counts["documents_read"] += 1
            if len(ids) < threshold:
                counts["documents_too_short"] += 1
                continue
            counts["documents_used"] += 1
            n = len(ids) // body  # the last partial window is dropped
            windows = np.asarray(ids[: n * body], dtype=job.dtype).reshape(n, body)
            if job.bos_token_id is not None:
                windows = np.concatenate([np.full((n, 1), job.bos_token_id, dtype=job.dtype), windows], axis=1)
            yield windows


def _fill_shards(job: _Job) -> dict[str, int]:
    """Write this worker's shards; return its counts (``contexts`` below what it needed: the corpus ran out)."""
    if job.num_workers > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; avoid oversubscription
    from neurolight.datamodules.llm.models import load_tokenizer

    tokenizer = load_tokenizer(job.tokenizer_path)
    rows = job.num_samples_per_file
    buffer = np.empty((rows, job.context_length), dtype=job.dtype)
    counts = {"documents_read": 0, "documents_too_short": 0, "documents_used": 0, "contexts": 0}
    shard, filled = 0, 0
    with tqdm(total=rows * job.num_shards, desc=f"worker {job.worker}", unit="ctx", position=job.worker) as bar:
        for windows in _contexts(job, tokenizer, counts):
            while len(windows):  # one document may straddle two shards
                take = min(rows - filled, len(windows))
                buffer[filled : filled + take], windows = windows[:take], windows[take:]
                filled += take
                counts["contexts"] += take
                bar.update(take)
                if filled < rows:
                    continue
                index = job.worker * job.num_shards + shard
                # Otherwise the rows of one document sit together; the seed mixes them within the shard.
                out = buffer if job.seed is None else np.random.default_rng([job.seed, index]).permutation(buffer)
                _save_atomic(Path(job.output_dir) / SHARD_NAME.format(index), out)
                shard, filled = shard + 1, 0
                if shard == job.num_shards:
                    return counts
    return counts


def _prepare_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output_dir {path} is not empty; pass --overwrite to replace it or choose another")
        # Delete only what this tool writes, metadata first so no reader sees it pointing at missing shards;
        # a mistyped output_dir must never cost the user unrelated files.
        (path / METADATA_FILE).unlink(missing_ok=True)
        for stale in [*path.glob("shard_*.npy"), *path.glob(".shard_*.npy.tmp")]:
            stale.unlink()
    path.mkdir(parents=True, exist_ok=True)


def build_tokenized_corpus(
    output_dir: str | Path,
    tokenizer: str = "smollm2-135m",
    dataset: str = PYDOC,
    data_files: list[str] | str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    min_tokens: int = 256,
    context_length: int | None = None,
    prepend_bos: bool | None = None,
    num_files: int = 1,
    num_samples_per_file: int = 10_000,
    num_processes: int = 1,
    overwrite: bool = False,
    seed: int | None = 0,
) -> Path:
    """Tokenize a corpus into shards of fixed-length contexts for SAE training.

    Args:
        output_dir: Directory for the shards (shard_00000.npy, ...) and metadata.json.
        tokenizer: Short model name (e.g. smollm2-135m), Hugging Face id or local directory of the tokenizer.
        dataset: Hugging Face dataset name, streamed; or 'pydoc', the standard library's help texts (offline).
        data_files: Local .txt/.json/.jsonl/.parquet files or globs, read instead of `dataset`; one format at a
            time; a .txt file is split into documents at blank lines.
        dataset_config: Configuration (subset) name of the Hugging Face dataset.
        split: Split of the Hugging Face dataset.
        text_field: Record field holding the document text (json, parquet and Hugging Face datasets).
        min_tokens: Documents with fewer tokens are skipped.
        context_length: Tokens per stored context, BOS included; default min_tokens. Contexts are
            non-overlapping windows of each document; the last partial window is dropped.
        prepend_bos: Start every context with the BOS token; default: when the tokenizer has one.
        num_files: Number of shards to write; a multiple of num_processes.
        num_samples_per_file: Contexts per shard.
        num_processes: Worker processes; worker w tokenizes the documents with index % num_processes == w and
            writes num_files / num_processes shards.
        overwrite: Replace the shards and metadata of a non-empty output_dir instead of refusing.
        seed: Seed for shuffling the contexts within each shard; null keeps document order.

    Returns:
        The output directory.
    """
    context_length = min_tokens if context_length is None else context_length
    sizes = dict(min_tokens=min_tokens, context_length=context_length, num_files=num_files)
    sizes.update(num_samples_per_file=num_samples_per_file, num_processes=num_processes)
    if bad := [f"{name}={value}" for name, value in sizes.items() if value < 1]:
        raise ValueError(f"{', '.join(bad)}: must be at least 1")
    if num_files % num_processes:
        raise ValueError(
            f"num_files={num_files} is not a multiple of num_processes={num_processes} (each process writes "
            f"num_files / num_processes shards); use e.g. num_files={num_files + (-num_files) % num_processes}"
        )
    if data_files and dataset != PYDOC:
        raise ValueError(f"give dataset ('{dataset}') or data_files, not both")
    output = Path(output_dir).expanduser()
    _prepare_output_dir(output, overwrite)

    from neurolight.datamodules.llm.models import load_tokenizer, resolve_model

    tokenizer_path = resolve_model(tokenizer)  # converts the embedded model once here, not in every worker
    tok = load_tokenizer(tokenizer_path)
    if prepend_bos is None:
        prepend_bos = tok.bos_token_id is not None
    if prepend_bos and tok.bos_token_id is None:
        raise ValueError(f"prepend_bos=True but tokenizer '{tokenizer}' has no BOS token; pass prepend_bos=False")
    if prepend_bos and context_length < 2:
        raise ValueError(f"context_length={context_length} leaves no room for document tokens after BOS; use >= 2")
    bos = tok.bos_token_id if prepend_bos else None
    dtype = "int32" if len(tok) < 2**31 else "int64"
    if data_files:  # expanded once here, so a bad path fails before any worker starts and all see the same files
        data_files = _expand_data_files(data_files)[0]
    source = dict(
        dataset=dataset, data_files=data_files, dataset_config=dataset_config, split=split, text_field=text_field
    )
    shared = dict(num_workers=num_processes, tokenizer_path=tokenizer_path, source=source, output_dir=str(output),
                  num_shards=num_files // num_processes, num_samples_per_file=num_samples_per_file,
                  context_length=context_length, min_tokens=min_tokens, bos_token_id=bos, dtype=dtype,
                  seed=seed)  # fmt: skip
    jobs = [_Job(worker=w, **shared) for w in range(num_processes)]
    shards = [output / SHARD_NAME.format(i) for i in range(num_files)]
    try:
        if num_processes == 1:
            results = [_fill_shards(jobs[0])]
        else:
            # 'spawn' rather than 'fork': the parent already holds tokenizer and torch threads, which fork can hang.
            # An executor, unlike Pool, raises BrokenProcessPool when a worker dies instead of waiting forever.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(num_processes, mp_context=context) as pool:
                results = list(pool.map(_fill_shards, jobs))
        _check_filled(results, jobs)
    except BaseException:
        for shard in shards:  # never leave a partial set of shards that looks usable
            shard.unlink(missing_ok=True)
        raise

    metadata = dict(tokenizer=tokenizer, tokenizer_path=tokenizer_path, vocab_size=len(tok), bos_token_id=bos,
                    context_length=context_length, min_tokens=min_tokens, num_files=num_files,
                    num_samples_per_file=num_samples_per_file, num_contexts=num_files * num_samples_per_file,
                    num_processes=num_processes, dtype=dtype, seed=seed, dataset=_describe(source),
                    counts={key: sum(r[key] for r in results) for key in results[0]},
                    shards=[shard.name for shard in shards])  # fmt: skip
    with atomic_path(output / METADATA_FILE, "corpus metadata") as temporary:
        temporary.write_text(json.dumps(metadata, indent=2))
    return output


def _describe(source: dict) -> dict:
    """The corpus as metadata.json records it."""
    if source["data_files"]:
        files, builder = _expand_data_files(source["data_files"])
        field = "text" if builder == "text" else source["text_field"]
        return {"data_files": files, "format": builder, "text_field": field}
    if source["dataset"] == PYDOC:
        return {"dataset": PYDOC, "description": "pydoc_data.topics: the Python standard library's help topics"}
    return {k: v for k, v in source.items() if k != "data_files" and v is not None}


def _check_filled(results: list[dict[str, int]], jobs: list[_Job]) -> None:
    needed_each = jobs[0].num_shards * jobs[0].num_samples_per_file
    if all(r["contexts"] >= needed_each for r in results):
        return
    produced, needed = sum(r["contexts"] for r in results), needed_each * len(jobs)
    read = sum(r["documents_read"] for r in results)
    if read == 0:
        raise ValueError(f"the corpus has no documents: {_describe(jobs[0].source)}")
    short = [f"worker {j.worker}: {r['contexts']}" for j, r in zip(jobs, results) if r["contexts"] < needed_each]
    split_note = f" Each of the {len(jobs)} processes needs {needed_each}; short: {', '.join(short)}." * (len(jobs) > 1)
    raise ValueError(
        f"the corpus ran out: {produced} contexts of {jobs[0].context_length} tokens produced, but num_files * "
        f"num_samples_per_file = {needed} needed ({read} documents read, "
        f"{sum(r['documents_too_short'] for r in results)} shorter than min_tokens={jobs[0].min_tokens}).{split_note} "
        "Lower num_samples_per_file or num_files, lower min_tokens, or use a bigger dataset."
    )


class TokenizedCorpus:
    """Read-only view of a directory written by ``build_tokenized_corpus``; the shards are memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        build = f"build it with: neurolight-tokenize --output_dir {self.path} --overwrite"
        if not self.path.is_dir():
            raise FileNotFoundError(f"tokenized corpus {self.path} does not exist; {build}")
        if not (self.path / METADATA_FILE).is_file():
            raise FileNotFoundError(
                f"{self.path / METADATA_FILE} is missing (unfinished or foreign directory); {build}"
            )
        self.metadata: dict = json.loads((self.path / METADATA_FILE).read_text())
        self.context_length: int = int(self.metadata["context_length"])
        self._rows = int(self.metadata["num_samples_per_file"])
        self._open()

    def _open(self) -> None:
        rebuild = f"rebuild the corpus with: neurolight-tokenize --output_dir {self.path} --overwrite"
        self._shards = []
        for name in self.metadata["shards"]:
            file = self.path / name
            if not file.is_file():
                raise FileNotFoundError(f"shard {file} listed in {METADATA_FILE} is missing; rebuild the corpus")
            try:
                shard = np.load(file, mmap_mode="r")
            except ValueError as error:  # numpy's "mmap length is greater than file size": a truncated file
                raise ValueError(
                    f"shard {file} is truncated or corrupted ({file.stat().st_size:,} bytes: {error}); {rebuild}"
                ) from None
            if shard.shape != (self._rows, self.context_length) or not np.issubdtype(shard.dtype, np.integer):
                raise ValueError(
                    f"shard {file} holds {shard.dtype} {shard.shape}, expected integer token ids of shape "
                    f"{(self._rows, self.context_length)}; {rebuild}"
                )
            self._shards.append(shard)

    def validate(self, vocab_size: int | None = None) -> None:
        """Check every token id against the vocabulary (of the metadata, or of the model that reads the corpus):
        a corrupted shard fails here, naming the file, not as an embedding's IndexError deep in training."""
        limit = min(v for v in (vocab_size, self.metadata.get("vocab_size")) if v is not None)
        for name, shard in zip(self.metadata["shards"], self._shards):
            low, high = int(shard.min()), int(shard.max())
            if low < 0 or high >= limit:
                raise ValueError(
                    f"shard {self.path / name} holds token ids in [{low}, {high}], outside the vocabulary of "
                    f"{limit} ids; the file is corrupted or was written for another tokenizer; rebuild the corpus "
                    f"with: neurolight-tokenize --output_dir {self.path} --overwrite"
                )

    # Pickling a memmap copies its whole contents; DataLoader workers reopen the files instead.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._shards) * self._rows

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"index out of range for a corpus of {n} contexts ({self.path})")
        return np.divmod(indices % n, self._rows)

    def __getitem__(self, index: int) -> np.ndarray:
        """One context, shape ``(context_length,)``, copied out of the memory map."""
        shard, row = self._locate(np.asarray([operator.index(index)]))
        return np.array(self._shards[shard[0]][row[0]])

    def batch(self, indices: Sequence[int] | np.ndarray) -> torch.LongTensor:
        """Contexts at ``indices`` (any order, negatives allowed), shape ``(len(indices), context_length)``."""
        shard, row = self._locate(np.asarray(indices, dtype=np.int64).reshape(-1))
        out = np.empty((len(shard), self.context_length), dtype=np.int64)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self._shards[s][row[mask]]
        return torch.from_numpy(out)
