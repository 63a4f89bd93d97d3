"""Harvest once: run the frozen LLM over a tokenized corpus and write the activations of one or several sites, all
read from the same forward pass, to an activation cache (format: ``neurolight.datamodules.sae.activation_cache``).

    neurolight-harvest --config configs/sae/harvest-demo.yaml

Shard ``k`` holds contexts ``k * contexts_per_shard ...`` of the corpus, in corpus order, so what a shard holds
depends on nothing but ``k``: a killed harvest, rerun with the same output directory, verifies the shards the
manifest lists (size and checksum), rewrites any that is damaged, and harvests the others; no row is duplicated or
missing. A full disk fails in one line naming the file; every shard listed until then stays valid.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from neurolight.datamodules.llm.capture import SitesReader, capture_sites
from neurolight.datamodules.llm.hooked import HOOK_POINTS, resolve_hook_point
from neurolight.datamodules.sae.activation_cache import (
    FORMAT,
    MANIFEST_FILE,
    SHARD_NAME,
    STORAGE_DTYPES,
    TOKENS_DIR,
    checksum,
    model_id,
    parse_site,
    read_manifest,
    save_array,
    to_storage,
    to_tensor,
    write_manifest,
)
from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus

# Settings that decide what the cache holds: a rerun into the same directory must agree with the manifest on them.
_PLAN = ("dataset_path", "model_name", "sites", "num_contexts", "num_tokens", "contexts_per_shard", "dtype",
         "llm_dtype", "exclude_first_position", "hook_points")  # fmt: skip
_DEFAULTS = {"contexts_per_shard": 256, "dtype": "float32", "llm_dtype": "float32", "exclude_first_position": True}
_CORPUS_KEYS = ("tokenizer", "context_length", "num_contexts", "seed", "dataset", "shards")


def harvest_activations(
    output_dir: str,
    dataset_path: str | None = None,
    model_name: str | None = None,
    sites: list[str] | None = None,
    num_contexts: int | None = None,
    num_tokens: int | None = None,
    contexts_per_shard: int | None = None,
    dtype: str | None = None,
    llm_dtype: str | None = None,
    exclude_first_position: bool | None = None,
    hook_points: dict[str, str] | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    compile_llm: bool = False,
    overwrite: bool = False,
    on_shard: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the activations of ``sites`` for the corpus's contexts to an activation cache; resume an unfinished one.

    Every setting from dataset_path to hook_points defaults to the value in the manifest of an existing cache in
    output_dir (so ``neurolight-harvest --output_dir DIR`` continues or repairs it), else to the default named.

    Args:
        output_dir: Directory of the cache (manifest.json, tokens/, one folder per site).
        dataset_path: Directory written by ``neurolight-tokenize`` (the tokenized corpus); required for a new cache.
        model_name: LLM to run: a short name (e.g. smollm2-135m), a Hugging Face id or a local directory; required
            for a new cache.
        sites: Sites to read from each forward pass, as ``layers.<layer_id>.<layer_type>``, e.g.
            ``[layers.15.mlp_sublayer, layers.10.mlp_activations]``; required for a new cache.
        num_contexts: Contexts to harvest, the first ones of the corpus; default: all of them.
        num_tokens: Tokens per context (the first num_tokens of each stored context); default: the corpus's
            context length.
        contexts_per_shard: Contexts per shard file (default 256); a shard holds contexts_per_shard x rows per
            context rows, and the harvest holds one shard of every site in memory while it fills it.
        dtype: Storage dtype of the activations: float32 (default) or bfloat16 (half the disk).
        llm_dtype: float32 (default), bfloat16 or float16 weights for the LLM.
        exclude_first_position: Leave position 0 (BOS / attention sink) out of the rows (default true), as the
            SAE trainer does.
        hook_points: Overrides of the module templates per layer type, e.g. ``{mlp_sublayer: model.layers.{}.mlp}``.
        batch_size: Contexts per LLM forward pass.
        device: Device of the LLM, e.g. cuda:0.
        compile_llm: torch.compile the truncated forward to the deepest site (CUDA graphs on CUDA, inductor with frozen
            weights on CPU), as ``compile_llm`` of the activation data modules; every batch, a shard's last one
            included, is padded to batch_size so one graph serves the whole harvest. The rows then equal the eager
            harvest's within rounding rather than bit for bit; the manifest does not record it.
        overwrite: Delete the cache in output_dir (its own files only) and harvest from scratch.
        on_shard: Called with (contexts done, contexts in all) before the first shard this run writes and after
            each one.

    Returns:
        The output directory.
    """
    from neurolight.datamodules.llm.models import dtype_from_name, load_causal_lm

    output = Path(output_dir).expanduser()
    if overwrite:
        _clear(output)
    manifest = read_manifest(output) if output.is_dir() else None
    if manifest is None and output.is_dir() and any(not p.name.startswith(".") for p in output.iterdir()):
        raise FileExistsError(
            f"output_dir {output} is not empty and holds no activation cache; choose another, or pass --overwrite"
        )
    _remove_temporaries(output)
    given = dict(dataset_path=dataset_path, model_name=model_name, sites=sites, num_contexts=num_contexts,
                 num_tokens=num_tokens, contexts_per_shard=contexts_per_shard, dtype=dtype, llm_dtype=llm_dtype,
                 exclude_first_position=exclude_first_position, hook_points=hook_points)  # fmt: skip
    plan = _plan(output, manifest, {k: v for k, v in given.items() if v is not None})
    corpus = TokenizedCorpus(plan["dataset_path"])
    _complete_plan(plan, corpus)
    if manifest is not None and _corpus_description(corpus) != manifest["corpus"]:
        raise ValueError(
            f"the corpus {corpus.path} differs from the one the cache in {output} was harvested from (its "
            "metadata.json changed); harvest into another output_dir, or pass --overwrite"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    done = _verified_shards(output, manifest) if manifest is not None else set()
    if manifest is not None and manifest["complete"] and len(done) == manifest["num_shards"]:
        if on_shard is not None:  # whole and verified: nothing to harvest, so no LLM to load
            on_shard(manifest["num_contexts"], manifest["num_contexts"])
        return output

    model = load_causal_lm(plan["model_name"], dtype=dtype_from_name(plan["llm_dtype"], "llm_dtype"), device=device)
    model.eval().requires_grad_(False)
    corpus.validate(model.get_input_embeddings().num_embeddings)
    templates = {**HOOK_POINTS, **plan["hook_points"]}
    hooks = [resolve_hook_point(model, *parse_site(site), templates) for site in plan["sites"]]
    probe = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    widths = {site: acts.shape[-1] for site, acts in zip(plan["sites"], capture_sites(model, hooks, probe))}
    if manifest is None:
        manifest = _new_manifest(plan, corpus, templates, hooks, widths, batch_size)
        output.mkdir(parents=True, exist_ok=True)
        write_manifest(output, manifest)
    elif {site: manifest["sites"][site]["d_in"] for site in plan["sites"]} != widths:
        raise ValueError(
            f"model {plan['model_name']} gives site widths {widths}, but the cache in {output} holds "
            f"{ {s: v['d_in'] for s, v in manifest['sites'].items()} }; harvest into another output_dir"
        )

    reader = SitesReader(model, [parse_site(site) for site in plan["sites"]], hooks, compile=compile_llm)
    if len(done) != len(manifest["shards"]):
        manifest.update(shards=[e for e in manifest["shards"] if e["index"] in done], complete=False)
        write_manifest(output, manifest)
    per_shard, total = manifest["contexts_per_shard"], manifest["num_contexts"]
    if on_shard is not None:
        on_shard(min(total, per_shard * len(manifest["shards"])), total)  # where this run starts
    for index in range(manifest["num_shards"]):
        if index in done:
            continue
        entry = _harvest_shard(output, manifest, corpus, reader, index, batch_size)
        manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["index"])
        write_manifest(output, manifest)
        if on_shard is not None:
            on_shard(min(total, per_shard * len(manifest["shards"])), total)
    if not manifest["complete"]:
        _finish(output, manifest)
    return output


def _plan(output: Path, manifest: dict | None, given: dict) -> dict:
    """The settings of this harvest: the manifest's (the given ones must agree), else the given ones + defaults."""
    if manifest is not None:
        plan = {key: manifest[key] for key in _PLAN}
        plan["sites"] = list(manifest["sites"])  # the manifest describes each site
        if "dataset_path" in given:
            given["dataset_path"] = str(Path(given["dataset_path"]).expanduser().absolute())
        differ = [f"{key}={given[key]!r} (the cache has {plan[key]!r})" for key in given if given[key] != plan[key]]
        if differ:
            raise ValueError(
                f"output_dir {output} holds an activation cache harvested with other settings: {'; '.join(differ)}; "
                "rerun with the cache's settings (or only --output_dir) to continue it, choose another output_dir, or "
                "pass --overwrite"
            )
        return plan
    missing = [key for key in ("dataset_path", "model_name", "sites") if key not in given]
    if missing:
        raise ValueError(f"a new activation cache in {output} needs {', '.join('--' + m for m in missing)}")
    plan = {**_DEFAULTS, "hook_points": {}, "num_contexts": None, "num_tokens": None, **given}
    plan["dataset_path"] = str(Path(plan["dataset_path"]).expanduser().absolute())
    if not plan["sites"] or len(set(plan["sites"])) != len(plan["sites"]):
        raise ValueError(f"sites {plan['sites']} must name at least one site, each once")
    for site in plan["sites"]:
        parse_site(site)
    if plan["dtype"] not in STORAGE_DTYPES:
        raise ValueError(f"unknown dtype '{plan['dtype']}'; choose one of {', '.join(STORAGE_DTYPES)}")
    if plan["contexts_per_shard"] < 1:
        raise ValueError(f"contexts_per_shard={plan['contexts_per_shard']} must be at least 1")
    return plan


def _complete_plan(plan: dict, corpus: TokenizedCorpus) -> None:
    """Fill num_contexts and num_tokens from the corpus and check them against it."""
    plan["num_contexts"] = len(corpus) if plan["num_contexts"] is None else plan["num_contexts"]
    plan["num_tokens"] = corpus.context_length if plan["num_tokens"] is None else plan["num_tokens"]
    if not 1 <= plan["num_contexts"] <= len(corpus):
        raise ValueError(f"num_contexts={plan['num_contexts']} must be between 1 and the corpus's {len(corpus)}")
    low = 2 if plan["exclude_first_position"] else 1
    if not low <= plan["num_tokens"] <= corpus.context_length:
        raise ValueError(
            f"num_tokens={plan['num_tokens']} must be between {low} and the corpus's context length "
            f"{corpus.context_length} ({corpus.path})"
        )


def _corpus_description(corpus: TokenizedCorpus) -> dict:
    return {"path": str(corpus.path.absolute()), **{key: corpus.metadata.get(key) for key in _CORPUS_KEYS}}


def _new_manifest(plan: dict, corpus, templates: dict, hooks, widths: dict, batch_size: int) -> dict:
    skip = int(plan["exclude_first_position"])
    rows_per_context = plan["num_tokens"] - skip
    return {
        "format": FORMAT,
        **plan,
        "model": model_id(plan["model_name"]),
        "hook_templates": templates,
        "corpus": _corpus_description(corpus),
        "first_position": skip,
        "rows_per_context": rows_per_context,
        "num_rows": plan["num_contexts"] * rows_per_context,
        "num_shards": -(-plan["num_contexts"] // plan["contexts_per_shard"]),
        "batch_size": batch_size,
        "sites": {
            site: {**dict(zip(("layer_type", "layer_id"), parse_site(site))), "hook_point": hook.name, "d_in": width}
            for (site, width), hook in zip(widths.items(), hooks)
        },
        "shards": [],
        "complete": False,
    }


def _verified_shards(output: Path, manifest: dict) -> set[int]:
    """The indices of the listed shards whose files are all whole (shape and checksum as the manifest says)."""
    good = set()
    for entry in manifest["shards"]:
        folders = [TOKENS_DIR, *manifest["sites"]]
        bad = next((folder for folder in folders if not _intact(output, folder, entry)), None)
        if bad is None:
            good.add(entry["index"])
        else:
            file = output / bad / SHARD_NAME.format(entry["index"])
            warnings.warn(f"{file} is truncated or corrupted: harvesting its shard again", stacklevel=3)
    return good


def _intact(output: Path, folder: str, entry: dict) -> bool:
    try:
        array = np.load(output / folder / SHARD_NAME.format(entry["index"]), mmap_mode="r")
    except (OSError, ValueError):  # missing, or truncated below its header's size
        return False
    return checksum(array) == entry["crc32"][folder]


@torch.no_grad()
def _harvest_shard(output: Path, manifest: dict, corpus, reader: SitesReader, index: int, batch_size: int) -> dict:
    per_shard, skip = manifest["contexts_per_shard"], manifest["first_position"]
    contexts = np.arange(index * per_shard, min((index + 1) * per_shard, manifest["num_contexts"]))
    ids = corpus.batch(contexts)[:, : manifest["num_tokens"]]
    rows_per_context, dtype = manifest["rows_per_context"], manifest["dtype"]
    arrays = {
        site: np.empty((len(contexts) * rows_per_context, info["d_in"]), STORAGE_DTYPES[dtype])
        for site, info in manifest["sites"].items()
    }
    sums = {site: torch.zeros(2, dtype=torch.float64) for site in arrays}
    for start in range(0, len(contexts), batch_size):
        for site, acts in zip(arrays, _read(reader, ids[start : start + batch_size], batch_size)):
            stored = to_storage(acts[:, skip:].reshape(-1, acts.shape[-1]), dtype)
            arrays[site][start * rows_per_context : start * rows_per_context + len(stored)] = stored
            # Statistics of the rows as stored (bfloat16 rounding included): what the SAE will be trained on.
            norms = to_tensor(stored, dtype).double().norm(dim=1)
            sums[site] += torch.stack([norms.sum(), norms.square().sum()])
    entry = {"index": index, "crc32": {}, "norm_sum": {}, "squared_norm_sum": {}}
    name = SHARD_NAME.format(index)
    entry["crc32"][TOKENS_DIR] = save_array(output / TOKENS_DIR / name, ids.numpy().astype(np.int32))
    for site, array in arrays.items():
        entry["crc32"][site] = save_array(output / site / name, array)
        entry["norm_sum"][site], entry["squared_norm_sum"][site] = sums[site].tolist()
    return entry


def _read(reader: SitesReader, batch: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The sites' activations of ``batch``; a compiled reader gets ``batch_size`` rows (the last repeated) so a ragged
    batch does not compile a second graph: rows of a batch do not interact, so the padding changes no kept row."""
    rows = len(batch)
    if reader.compiled and rows < batch_size:
        batch = torch.cat([batch, batch[-1:].expand(batch_size - rows, -1)])
    return [acts[:rows] for acts in reader.read(batch)]


def _finish(output: Path, manifest: dict) -> None:
    """Per-site norm statistics over all rows, then mark the cache complete."""
    rows = manifest["num_rows"]
    for site, info in manifest["sites"].items():
        info["mean_norm"] = sum(e["norm_sum"][site] for e in manifest["shards"]) / rows
        info["mean_squared_norm"] = sum(e["squared_norm_sum"][site] for e in manifest["shards"]) / rows
    manifest["complete"] = True
    write_manifest(output, manifest)


def _remove_temporaries(output: Path) -> None:
    """Files a killed write left under their temporary names (``datamodules/files.py``). The caller holds the
    folder (``neurolight-harvest`` locks it), so no live write owns them."""
    stale = [*output.glob(f".{MANIFEST_FILE}.*.tmp")] if output.is_dir() else []
    for folder in [output / TOKENS_DIR, *output.glob("layers.*")]:
        stale += folder.glob(".shard_*.npy.*.tmp") if folder.is_dir() else []
    for path in stale:
        path.unlink()


def _clear(output: Path) -> None:
    """Delete what a harvest writes in ``output`` (manifest first, so no reader sees it pointing at missing shards)."""
    if not output.is_dir():
        return
    _remove_temporaries(output)
    (output / MANIFEST_FILE).unlink(missing_ok=True)
    for folder in [output / TOKENS_DIR, *output.glob("layers.*")]:
        if folder.is_dir():
            for stale in folder.glob("shard_*.npy"):
                stale.unlink()
            if not any(folder.iterdir()):
                shutil.rmtree(folder)
