"""The activation cache on disk: what ``neurolight-harvest`` writes and ``CachedActivationDataModule`` reads.

A cache directory holds, for contexts ``0 .. num_contexts-1`` of a tokenized corpus (docs/sae.md, Activation cache)::

    manifest.json                 model, sites, corpus, context length, dtype, per-shard checksums and norm sums
    tokens/shard_00000.npy        (contexts_per_shard, num_tokens) int32 token ids of the shard's contexts
    layers.15.mlp_sublayer/shard_00000.npy   (contexts_per_shard * rows_per_context, d_in) activations, one per site

Rows are tokens: row ``r`` is position ``first_position + r % rows_per_context`` of context ``r // rows_per_context``
(``first_position`` is 1 when position 0 was left out, else 0). A shard is float32, or bfloat16 stored as its raw
uint16 bits (numpy has no bfloat16); every file is memory-mapped. Files are written under a temporary name and
renamed, and a shard enters the manifest only once all its files are in place, so a killed or failed harvest
leaves whole, listed shards only.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from neurolight.datamodules.files import atomic_path

MANIFEST_FILE = "manifest.json"
TOKENS_DIR = "tokens"
SHARD_NAME = "shard_{:05d}.npy"
FORMAT = "neurolight-activation-cache/1"
STORAGE_DTYPES = {"float32": np.float32, "bfloat16": np.uint16}
"""Storage dtype name -> the numpy dtype of the shard files (bfloat16: its raw bits)."""
_SITE = re.compile(r"^layers\.(\d+)\.(\w+)$")


def site_name(layer_type: str, layer_id: int) -> str:
    """The name of a site in a cache, and its folder: ``layers.15.mlp_sublayer``."""
    return f"layers.{layer_id}.{layer_type}"


def parse_site(name: str) -> tuple[str, int]:
    """``layers.15.mlp_sublayer`` -> ``("mlp_sublayer", 15)``."""
    match = _SITE.match(name)
    if match is None:
        raise ValueError(
            f"site '{name}' is not of the form layers.<layer_id>.<layer_type>, e.g. layers.15.mlp_sublayer"
        )
    return match.group(2), int(match.group(1))


def check_site_names(sites: list[str]) -> None:
    """Refuse a data module's ``sites`` list that is empty, names a site malformed or names one twice."""
    if not sites:
        raise ValueError("sites is empty; name at least one site, or leave it out to use layer_type/layer_id")
    for name in sites:
        parse_site(name)  # raises on a malformed name
    if duplicates := sorted({name for name in sites if sites.count(name) > 1}):
        raise ValueError(f"sites names {', '.join(duplicates)} more than once; list every site once")


def model_id(name: str) -> str:
    """What a model name stands for: the Hugging Face id of a short name, the absolute path of a local directory."""
    from neurolight.datamodules.llm.models import MODELS

    if name in MODELS:
        return MODELS[name]
    path = Path(name).expanduser()
    return str(path.absolute()) if path.exists() else name


def checksum(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C order)."""
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def save_array(path: Path, array: np.ndarray) -> int:
    """Write ``array`` as ``.npy`` through a temporary name (a full disk names the file); return its checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(array)
    with atomic_path(path, f"activation-cache shard ({array.nbytes:,} bytes)") as temporary, open(temporary, "wb") as f:
        # np.save's bytes, written by Python's write: on a full disk ndarray.tofile says neither why nor ENOSPC.
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(array.reshape(-1).view(np.uint8).data)
    return checksum(array)


def write_manifest(directory: Path, manifest: dict) -> None:
    with atomic_path(directory / MANIFEST_FILE, "activation-cache manifest") as temporary:
        temporary.write_text(json.dumps(manifest, indent=1))


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory``, or None where there is none."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete the cache and harvest it again") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an activation-cache manifest of this version ({FORMAT})")
    return manifest


def to_tensor(array: np.ndarray, dtype: str) -> Tensor:
    """Rows read from a shard as a tensor of the cache's dtype (bfloat16 from its uint16 bits)."""
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def to_storage(rows: Tensor, dtype: str) -> np.ndarray:
    """(n, d_in) activations -> the array a shard stores (bfloat16 as its uint16 bits)."""
    if dtype == "bfloat16":
        return rows.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return rows.detach().to("cpu", torch.float32).numpy()


class ActivationCache:
    """A finished cache directory, read-only; shard files are memory-mapped when a site is opened."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        manifest = read_manifest(self.path) if self.path.is_dir() else None
        if manifest is None:
            raise FileNotFoundError(
                f"{self.path} is not an activation cache (no {MANIFEST_FILE}); write one with: neurolight-harvest "
                f"--output_dir {self.path} --dataset_path CORPUS --model_name MODEL --sites [layers.L.SITE]"
            )
        if not manifest["complete"]:
            raise ValueError(
                f"activation cache {self.path} is unfinished ({len(manifest['shards'])} of {manifest['num_shards']} "
                f"shards); continue the harvest with: neurolight-harvest --output_dir {self.path}"
            )
        if [entry["index"] for entry in manifest["shards"]] != list(range(manifest["num_shards"])):
            raise ValueError(
                f"the manifest of activation cache {self.path} does not list shards 0-{manifest['num_shards'] - 1} in "
                "order (edited by hand?); harvest the cache again with neurolight-harvest --overwrite"
            )
        self.manifest = manifest
        self.dtype: str = manifest["dtype"]
        self.rows_per_context: int = manifest["rows_per_context"]
        self.rows_per_shard: int = manifest["contexts_per_shard"] * self.rows_per_context
        self.num_rows: int = manifest["num_rows"]
        self._shards: dict[str, list[np.ndarray]] = {}

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    def d_in(self, site: str) -> int:
        return int(self.manifest["sites"][site]["d_in"])

    def mean_norm(self, site: str) -> float:
        """Mean L2 norm of the site's rows (all of them, as stored)."""
        return float(self.manifest["sites"][site]["mean_norm"])

    def _repair(self, file: Path, problem: str) -> ValueError:
        return ValueError(
            f"shard {file} {problem}; rewrite it with: neurolight-harvest --output_dir {self.path} (it keeps the "
            "shards that are whole)"
        )

    def _shard_rows(self, index: int) -> int:
        per_shard = self.manifest["contexts_per_shard"]
        return min(per_shard, self.manifest["num_contexts"] - index * per_shard) * self.rows_per_context

    def _load(self, folder: str, index: int, shape: tuple[int, int], dtype, crc: int, verify: bool) -> np.ndarray:
        file = self.path / folder / SHARD_NAME.format(index)
        if not file.is_file():
            raise self._repair(file, "is missing")
        try:
            array = np.load(file, mmap_mode="r")
        except (ValueError, OSError) as error:  # numpy's "mmap length is greater than file size": truncated
            raise self._repair(file, f"is truncated or corrupted ({file.stat().st_size:,} bytes: {error})") from None
        if array.shape != shape or array.dtype != dtype:
            raise self._repair(file, f"holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}")
        if verify and checksum(array) != crc:
            raise self._repair(file, "is corrupted (its checksum differs from the manifest's)")
        return array

    def open(self, site: str, verify: bool = True) -> None:
        """Memory-map the shards of ``site``; with ``verify``, check every shard's checksum (reads it once)."""
        if site in self._shards:
            return
        d_in, shards = self.d_in(site), []
        for entry in self.manifest["shards"]:
            index = entry["index"]
            shape = (self._shard_rows(index), d_in)
            dtype = STORAGE_DTYPES[self.dtype]
            shards.append(self._load(site, index, shape, dtype, entry["crc32"][site], verify))
        self._shards[site] = shards

    def read(self, site: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``site`` (an opened site), copied out of the memory maps (into ``out`` when given);
        may span shards."""
        shards = self._shards[site]
        out = np.empty((stop - start, shards[0].shape[1]), shards[0].dtype) if out is None else out
        at = 0
        while start < stop:
            shard, offset = divmod(start, self.rows_per_shard)
            take = min(stop - start, self.rows_per_shard - offset)
            out[at : at + take] = shards[shard][offset : offset + take]
            start, at = start + take, at + take
        return out

    def row_location(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(context index, position in the context) of each row."""
        context, offset = np.divmod(np.asarray(rows, dtype=np.int64), self.rows_per_context)
        return context, offset + self.manifest["first_position"]

    def tokens(self, contexts: np.ndarray) -> np.ndarray:
        """(n, num_tokens) token ids of the given contexts (read from the token shards)."""
        per_shard = self.manifest["contexts_per_shard"]
        shard, offset = np.divmod(np.asarray(contexts, dtype=np.int64), per_shard)
        out = np.empty((len(shard), self.manifest["num_tokens"]), dtype=np.int64)
        for index in np.unique(shard):
            file = self.path / TOKENS_DIR / SHARD_NAME.format(index)
            out[shard == index] = np.load(file, mmap_mode="r")[offset[shard == index]]
        return out
