"""SAE training throughput from the activation cache against training from the LLM, measured in the same run.

    .venv/bin/python bench/cache_throughput.py [--tokens 32768] [--cache-tokens 65536] [--threads 1] [--repeats 1]

Both sides train the SAE of ``configs/sae/demo.yaml`` (576 -> 2304 TopK, k=32, float32, 512 tokens per step) with a
Lightning ``Trainer`` and no validation, checkpoints or logger:

- LLM: ``ActivationDataModule`` with the recipe's settings (SmolLM2-135M-Instruct, output of ``model.layers.15.mlp``,
  16 contexts of 64 tokens per forward, a 16-batch mixing buffer), as ``bench/sae_throughput.py`` runs it.
- cache: ``CachedActivationDataModule`` over a cache of the same site, harvested first by ``harvest_activations``
  (timed too: what harvesting costs per token) from the recipe's corpus, float32, one context's rows per block.

Timed per side: from the start of training (after setup and model loading; the LLM side's first buffer fill is
inside) to the end of the last step, so tokens/s = steps x 512 / that time. With ``--repeats N`` the sides alternate
(LLM, cache, cache, LLM, ...) and the medians are compared. The 1-, 5- and 15-minute load averages
(``os.getloadavg``) are printed before and after every side: on a shared machine the ratio is only as good as the
load was even. ``--threads 1`` gives steadier figures on a loaded CPU (see bench/README.md). Options: ``--cache DIR``
(an existing cache of the site: no harvest), ``--workdir DIR``, ``--json FILE``, ``--llm-dtype bfloat16`` (the
harvest's LLM weights).

``--compare-harvest`` times the harvest alone instead (on ``--device``, e.g. cuda; ``--model`` replaces the recipe's
LLM, e.g. a random-weight one saved by ``bench/gpu_kit.sh``), eager against ``compile_llm`` (inductor with frozen
weights on CPU, CUDA graphs on CUDA), alternating per ``--repeats``, timed after the first shard (which holds the
model's probes and the compilation), and prints the relative difference of the two caches' rows.

``--stream`` times the cached stream alone (``CachedActivationDataModule.train_stream``, ``--batch-sae`` rows a
batch, default 4096 as on a GPU), reading in the consumer's thread (``prefetch_batches: 0``) against reading ahead
(``--prefetch``), with the training step emulated by a sleep of each of ``--step-ms`` (on a GPU the step runs on the
device while the CPU waits; 0 = reading alone). Each batch is copied once after it is served, as the transfer to the
device does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from sae_runs import load_recipe, prepare_corpus  # noqa: E402  (bench/, beside this script)


def load() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def fit(recipe: dict, datamodule, steps: int, workdir: str) -> dict:
    """Train the recipe's SAE for ``steps`` steps; the training wall time and the load before and after."""
    import lightning.pytorch as pl

    from neurolight.lightning_modules import SparseAutoencoderModule

    marks: dict[str, float] = {}

    class Timer(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            marks["start"] = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            marks["end"] = time.perf_counter()

    pl.seed_everything(recipe["seed"], verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False, callbacks=[Timer()],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, log_every_n_steps=10, default_root_dir=workdir,
    )  # fmt: skip
    before = load()
    trainer.fit(SparseAutoencoderModule(**recipe["model"]), datamodule=datamodule)
    if trainer.global_step != steps:
        raise RuntimeError(f"trained {trainer.global_step} steps, expected {steps}")
    return {"seconds": marks["end"] - marks["start"], "load_before": before, "load_after": load()}


def run_llm(args, recipe: dict, steps: int) -> dict:
    from neurolight.datamodules import ActivationDataModule

    datamodule = ActivationDataModule(**{**recipe["data"], "dataset_path": args.corpus})
    return fit(recipe, datamodule, steps, args.workdir)


def run_cache(args, recipe: dict, steps: int) -> dict:
    from neurolight.datamodules import CachedActivationDataModule

    data = recipe["data"]
    datamodule = CachedActivationDataModule(
        args.cache, layer_id=data["layer_id"], layer_type=data["layer_type"], model_name=data["model_name"],
        batch_size_autoencoder=data["batch_size_autoencoder"], block_rows=int(data["num_tokens"]) - 1,
        val_contexts=data["val_contexts"], prefetch_batches=args.prefetch,
    )  # fmt: skip
    return fit(recipe, datamodule, steps, args.workdir)


def harvest(args, recipe: dict, cache_steps: int, compile_llm: bool = False, output: str | None = None) -> dict:
    from neurolight.datamodules.sae.harvest import harvest_activations

    data = recipe["data"]
    rows_per_context = int(data["num_tokens"]) - 1
    contexts = math.ceil(cache_steps * int(data["batch_size_autoencoder"]) / rows_per_context) + data["val_contexts"]
    shards: list[float] = []  # when each shard was written: the compiled side's first shard holds the compilation
    per_shard = int(data["batch_size_llm"]) * 4
    before, start = load(), time.perf_counter()
    harvest_activations(
        output or args.cache, dataset_path=args.corpus, model_name=data["model_name"],
        sites=[f"layers.{data['layer_id']}.{data['layer_type']}"], num_contexts=contexts,
        num_tokens=int(data["num_tokens"]), batch_size=int(data["batch_size_llm"]), overwrite=True,
        llm_dtype=args.llm_dtype, compile_llm=compile_llm, device=args.device, contexts_per_shard=per_shard,
        on_shard=lambda done, total: shards.append(time.perf_counter()),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    # Timed from the end of the first shard: model loading, probes and the compilation are left out of both sides.
    steady = (contexts - per_shard) * rows_per_context / (shards[-1] - shards[1]) if len(shards) > 2 else None
    return {"tokens": contexts * rows_per_context, "seconds": seconds, "first_shard_s": shards[1] - start,
            "steady_tokens_per_s": steady, "load_before": before, "load_after": load()}  # fmt: skip


def compare_harvest(args, recipe: dict, cache_steps: int) -> dict:
    """Eager against compiled harvests of the same contexts, alternating; then their rows compared."""
    import numpy as np

    from neurolight.datamodules.sae.activation_cache import ActivationCache

    runs: dict[str, list] = {"eager": [], "compiled": []}
    for i in range(args.repeats):
        for side in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
            out = str(Path(args.workdir) / f"cache-{side}")
            run = harvest(args, recipe, cache_steps, compile_llm=side == "compiled", output=out)
            runs[side].append(run)
            print(f"harvest {side:8s}: {run['tokens']} tokens in {run['seconds']:.1f} s (first shard "
                  f"{run['first_shard_s']:.1f} s), steady {run['steady_tokens_per_s']:.0f} tokens/s "
                  f"(load {run['load_before']} -> {run['load_after']})", flush=True)  # fmt: skip
    rates = {side: statistics.median(r["steady_tokens_per_s"] for r in runs[side]) for side in runs}
    caches = [ActivationCache(Path(args.workdir) / f"cache-{side}") for side in runs]
    site = caches[0].sites[0]
    rows = []
    for cache in caches:
        cache.open(site)
        rows.append(np.asarray(cache.read(site, 0, cache.num_rows), dtype=np.float32))
    error = float(np.linalg.norm(rows[0] - rows[1]) / np.linalg.norm(rows[0]))
    print(f"compiled / eager harvest: {rates['compiled'] / rates['eager']:.2f}x tokens/s (medians of {args.repeats}, "
          f"after the first shard); rows' relative difference {error:.2e} ({args.llm_dtype}); "
          f"load {load()}")  # fmt: skip
    return {"runs": runs, "ratio": rates["compiled"] / rates["eager"], "relative_difference": error}


def stream(args, recipe: dict) -> dict:
    """ms per batch of the cached stream, without and with reading ahead, for each emulated step time."""
    from neurolight.datamodules import CachedActivationDataModule

    data = recipe["data"]
    batch, results = args.batch_sae or 4096, []
    for step_ms in [float(ms) for ms in args.step_ms.split(",")]:
        row = {"step_ms": step_ms}
        for i in range(args.repeats):
            for depth in (0, args.prefetch) if i % 2 == 0 else (args.prefetch, 0):
                module = CachedActivationDataModule(
                    args.cache, layer_id=data["layer_id"], layer_type=data["layer_type"], batch_size_autoencoder=batch,
                    block_rows=int(data["num_tokens"]) - 1, val_contexts=data["val_contexts"], prefetch_batches=depth,
                    verify_checksums=False,
                )  # fmt: skip
                module.setup("fit")
                batches = module.train_stream()
                next(batches)  # the thread's start and the first window's read are left out of both sides
                start = time.perf_counter()
                for _ in range(args.stream_batches):
                    next(batches).clone()  # what the copy to the device reads
                    time.sleep(step_ms / 1000)
                row.setdefault(depth, []).append(1000 * (time.perf_counter() - start) / args.stream_batches)
                module.teardown("fit")
        ms = {depth: statistics.median(row[depth]) for depth in (0, args.prefetch)}
        print(f"step {step_ms:5.1f} ms: {ms[0]:6.1f} ms a batch reading in the step's thread, {ms[args.prefetch]:6.1f} "
              f"reading {args.prefetch} ahead ({ms[0] / ms[args.prefetch]:.2f}x; {batch} rows a batch, medians of "
              f"{args.repeats}; load {load()})", flush=True)  # fmt: skip
        results.append({"step_ms": step_ms, "ms_per_batch": {str(k): v for k, v in ms.items()}})
    return {"batch_rows": batch, "rows": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/sae/demo.yaml"))
    parser.add_argument("--tokens", type=int, default=32768, help="training tokens from the LLM per run")
    parser.add_argument("--cache-tokens", type=int, default=65536, help="training tokens from the cache per run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating LLM cache cache LLM ...")
    parser.add_argument("--corpus", default=None, help="tokenized corpus (default: the recipe's, else built)")
    parser.add_argument("--cache", default=None, help="an existing cache of the site (default: harvested)")
    parser.add_argument("--llm-dtype", default="float32", help="the harvest's LLM weights: float32 or bfloat16")
    parser.add_argument("--compare-harvest", action="store_true", help="time eager against compiled harvests only")
    parser.add_argument("--device", default="cpu", help="the harvest's device (the fits run on CPU)")
    parser.add_argument("--model", default=None, help="LLM instead of the recipe's (a name or a directory)")
    parser.add_argument("--batch-llm", type=int, default=None, help="contexts per forward (default: the recipe's)")
    parser.add_argument("--stream", action="store_true", help="time the cached stream alone, with and without "
                        "reading ahead (see the docstring)")  # fmt: skip
    parser.add_argument("--batch-sae", type=int, default=None, help="--stream: rows a batch (default 4096)")
    parser.add_argument(
        "--prefetch", type=int, default=4, help="batches read ahead by the cached stream (--stream: against 0)"
    )
    parser.add_argument("--step-ms", default="0,2,5,10", help="--stream: emulated step times, ms, comma-separated")
    parser.add_argument("--stream-batches", type=int, default=64, help="--stream: batches timed per run")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from neurolight.datamodules.llm.models import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="cache-throughput-")
    recipe = load_recipe(args.config)
    if args.model:
        recipe["data"]["model_name"] = args.model
    if args.batch_llm:
        recipe["data"]["batch_size_llm"] = args.batch_llm
    batch = int(recipe["data"]["batch_size_autoencoder"])
    steps, cache_steps = math.ceil(args.tokens / batch), math.ceil(args.cache_tokens / batch)
    print(f"[bench] load {load()} (1/5/15 min), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    args.corpus = prepare_corpus(recipe, args.corpus, resolve_model(recipe["data"]["model_name"]), Path(args.workdir))
    if args.compare_harvest:
        results = compare_harvest(args, recipe, cache_steps)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    results: dict = {"harvest": None, "llm": [], "cache": []}
    if args.stream and args.cache is None:
        raise SystemExit("--stream reads an existing cache: pass --cache DIR (e.g. runs/demo/cache)")
    if args.stream:
        results = stream(args, recipe)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    if args.cache is None:
        args.cache = str(Path(args.workdir) / "cache")
        results["harvest"] = h = harvest(args, recipe, cache_steps)
        print(f"harvest: {h['tokens']} tokens in {h['seconds']:.1f} s, {h['tokens'] / h['seconds']:.0f} tokens/s "
              f"(load {h['load_before']} -> {h['load_after']})", flush=True)  # fmt: skip
    order = [side for i in range(args.repeats) for side in (("llm", "cache") if i % 2 == 0 else ("cache", "llm"))]
    for side in order:
        run = run_llm(args, recipe, steps) if side == "llm" else run_cache(args, recipe, cache_steps)
        run["tokens"] = (steps if side == "llm" else cache_steps) * batch
        run["tokens_per_s"] = run["tokens"] / run["seconds"]
        results[side].append(run)
        print(f"fit from the {side:5s}: {run['tokens']} tokens in {run['seconds']:.1f} s, {run['tokens_per_s']:.0f} "
              f"tokens/s (load {run['load_before']} -> {run['load_after']})", flush=True)  # fmt: skip
    rates = {side: statistics.median(r["tokens_per_s"] for r in results[side]) for side in ("llm", "cache")}
    results["ratio"] = rates["cache"] / rates["llm"]
    print(f"cache / LLM: {results['ratio']:.1f}x tokens/s (medians of {args.repeats}; target >= 5x); load {load()}")
    if results["harvest"]:
        h = results["harvest"]
        print(f"harvest / LLM fit: {h['tokens'] / h['seconds'] / rates['llm']:.2f}x tokens/s (the harvest runs the "
              "same forward without the SAE step)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
