"""Soak test of resuming: each job killed with SIGKILL at a random time, resumed as a user would, and compared with
one uninterrupted run of the same recipe.

    PATH=$PATH:.venv/bin .venv/bin/python bench/soak.py --trials 10 \
        --jobs send,sae,sample,interpret-sqlite,interpret-es [--model smollm2-135m] [--full] [--set JOB:KEY=VALUE]

Jobs run the demo recipes (configs/) through the ``neurolight`` command, each run its own process, with
``OMP_NUM_THREADS=--threads``: ``send`` (configs/send/demo.yaml, resumed with ``--ckpt_path .../last.ckpt`` when the
killed run left one, else rerun), ``sae`` (configs/sae/demo.yaml on a corpus of ``neurolight-tokenize``, resumed from
its newest checkpoint), ``sample`` (configs/interpret/sample.yaml on the reference SAE; the same command again),
``interpret-sqlite`` and ``interpret-es`` (configs/interpret/demo.yaml on the reference samples, into SQLite or into
Elasticsearch on a local noida-db; the same command again). Unless ``--full``, the recipes are shrunk (``SHRINK``)
so that a trial takes a minute or so on two CPU cores; ``--set sae:trainer.max_steps=40`` changes one setting
(``callbacks.<Class>.<arg>`` for a callback's). Per trial: the kill time is drawn uniformly between 5% and 95% of
the reference run's wall time (seeded); after the kill and the resume the outputs are compared with the
reference's: the weights (model.safetensors, the SAE's last.ckpt) bit for bit, with the largest difference; the
metrics rows (lost: a reference row missing; duplicated: a row there twice); the samples file byte for byte; the
stored documents (each latent once, equal but for their time). Printed: each trial, then per job how many trials
were identical, the machine load and cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from soak_compare import COMPARE, resume_arguments  # noqa: E402

JOBS = ("send", "sae", "sample", "interpret-sqlite", "interpret-es")
RECIPES = {"send": "send/demo.yaml", "sae": "sae/demo.yaml", "sample": "interpret/sample.yaml",
           "interpret-sqlite": "interpret/demo.yaml", "interpret-es": "interpret/demo.yaml"}  # fmt: skip
CORPUS = ["--dataset", "pydoc", "--min_tokens", "64", "--context_length", "64", "--num_files", "2"]
SHRINK = {
    "corpus": {"num_samples_per_file": 320},  # the demo: 640
    "send": {"trainer.max_epochs": 3, "data.init_args.max_samples": 48,  # 4 epochs of 300 questions
             "callbacks.SensitiveNeuronDropout.identify_every_n_epochs": 1,
             "callbacks.SensitiveNeuronDropout.drop_epochs": 2},
    "sae": {"trainer.max_steps": 24, "trainer.val_check_interval": 24,  # 160 steps, a checkpoint every 80
            "callbacks.SaeCheckpoint.batches_between_ckpt": 8,
            "callbacks.DeadLatentResampler.neuron_resampling_interval": 8,
            "callbacks.DeadLatentResampler.last_resampling_step": 16,
            "callbacks.DeadLatentResampler.num_resampling_inputs": 2048,
            "data.init_args.num_batches_preload": 8, "data.init_args.batch_size_llm": 8},
    "sample": {"data.init_args.frequency_tokens": 4096, "data.init_args.num_samples": 128,  # 8192, 256
               "data.init_args.batch_size": 8,
               # the demo's default (4096 contexts) is more than the whole demo run: a kill would redo all of it
               "callbacks.InterpretationSamplesWriter.snapshot_every_n_contexts": 32},
    "interpret": {"data.init_args.max_latents": 4, "data.init_args.batch_size": 2,  # 24 latents, batches of 4
                  "model.init_args.max_explanation_tokens": 12},  # 24
}  # fmt: skip


def set_key(recipe: dict, key: str, value) -> None:
    """``a.b.c`` in the recipe; ``callbacks.<Class>.<arg>`` is an init argument of that callback."""
    parts = key.split(".")
    if parts[0] == "callbacks":
        for callback in recipe["trainer"]["callbacks"]:
            if callback["class_path"].rsplit(".", 1)[-1] == parts[1]:
                callback.setdefault("init_args", {})[parts[2]] = value
                return
        raise KeyError(f"no callback {parts[1]} in the recipe")
    node = recipe
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def write_recipe(job: str, folder: Path, inputs: dict, settings: dict) -> Path:
    """The job's demo recipe with its outputs in ``folder``, the model, the inputs and ``settings``."""
    recipe = yaml.safe_load((ROOT / "configs" / RECIPES[job]).read_text())
    model = inputs["model"]
    paths = {"trainer.default_root_dir": str(folder)}
    if job in ("send", "sae"):
        paths |= {"trainer.logger.init_args.save_dir": str(folder), "data.init_args.model_name": model}
        # The SEND demo leaves the version unset: a resumed run would log to version_1 (what the SAE demo avoids).
        paths["trainer.logger.init_args.version"] = 0
    if job == "send":
        paths |= {"model.init_args.model_name": model, "model.init_args.output_dir": str(folder / "model")}
    elif job == "sae":
        paths["data.init_args.dataset_path"] = str(inputs["corpus"])
    elif job == "sample":
        paths |= {
            "callbacks.InterpretationSamplesWriter.save_path": str(folder / "samples"),
            "model.init_args.sae_checkpoint": str(inputs["sae"]),
            "data.init_args.dataset_path": str(inputs["corpus"]),
        }
    else:
        store = {"class_path": "neurolight.callbacks.SQLiteStore", "init_args": {"path": str(folder / "store.sqlite")}}
        if job == "interpret-es":
            store = {"class_path": "neurolight.callbacks.ElasticsearchStore",
                     "init_args": {"server_address": inputs["es"], "api_key_env": None}}  # fmt: skip
        paths |= {"callbacks.InterpretationWriter.store": store, "model.init_args.explainer_model": model,
                  "callbacks.InterpretationWriter.browser_path": str(folder / "feature_browser.html"),
                  "callbacks.InterpretationWriter.index_name": f"soak-{folder.parent.name}-{folder.name}",
                  "data.init_args.samples_path": str(inputs["samples"])}  # fmt: skip
    for key, value in {**paths, **settings}.items():
        set_key(recipe, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def neurolight(args: list[str], log: Path, threads: int, kill_after: float | None = None) -> tuple[int, float]:
    """Runs ``python -m neurolight *args`` (its own process group), SIGKILLed after ``kill_after`` s if still
    running; returns its exit code (-9 when killed) and wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NEUROLIGHT_PROGRESS_SECONDS": "5"}
    start = time.monotonic()
    with log.open("a") as output:
        output.write(f"$ neurolight {' '.join(args)}\n")
        output.flush()
        process = subprocess.Popen(
            [sys.executable, "-m", "neurolight", *args],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # kill -9: no handler runs, nothing is flushed
            process.wait()
    return process.returncode, time.monotonic() - start


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def reference(job: str, work: Path, inputs: dict, settings: dict, threads: int) -> tuple[Path, float]:
    folder = work / job / "reference"
    config = write_recipe(job, folder, inputs, settings)
    code, wall = neurolight([*COMMAND[job], "--config", str(config)], folder.parent / "reference.log", threads)
    if code != 0:
        raise SystemExit(f"the reference run of {job} failed ({code}): {last_line(folder.parent / 'reference.log')}")
    print(f"{job}: reference run {wall:.0f} s", flush=True)
    return folder, wall


COMMAND = {"send": ["fit"], "sae": ["fit"], "sample": ["predict"], "interpret-sqlite": ["predict"],
           "interpret-es": ["predict"]}  # fmt: skip


def trial(job: str, number: int, work: Path, inputs: dict, settings: dict, ref: tuple[Path, float], rng, threads):
    folder = work / job / f"trial{number}"
    config = write_recipe(job, folder, inputs, settings)
    log = folder.parent / f"trial{number}.log"
    kill_at = rng.uniform(0.05, 0.95) * ref[1]
    code, _ = neurolight([*COMMAND[job], "--config", str(config)], log, threads, kill_after=kill_at)
    killed = code == -signal.SIGKILL
    resume, resumed_from = resume_arguments(job, folder, inputs) if killed else ([], "not killed")
    code, _ = neurolight([*COMMAND[job], "--config", str(config), *resume], log, threads) if killed else (code, 0)
    if code != 0:
        result = {"identical": False, "failed": f"exit {code}: {last_line(log)}"}
    else:
        result = COMPARE[job](folder, ref[0], inputs)
    result |= {"job": job, "trial": number, "kill_at_s": round(kill_at, 1), "killed": killed, "from": resumed_from}
    print(json.dumps(result), flush=True)
    return result


def summary(results: list[dict]) -> str:
    rows = ["| job | identical | killed mid-run | resumed from | lost | duplicated | largest difference |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for job in dict.fromkeys(r["job"] for r in results):
        runs = [r for r in results if r["job"] == job]
        starts = {}
        for r in runs:
            starts[r["from"]] = starts.get(r["from"], 0) + 1
        lost = sum(r.get("lost", 0) for r in runs)
        duplicated = sum(r.get("duplicated", 0) for r in runs)
        unit = runs[0].get("unit", "")
        diff = max((r.get("max_abs_diff", 0.0) for r in runs), default=0.0)
        failed = [r["failed"] for r in runs if "failed" in r]
        rows.append(
            f"| {job} | {sum(r['identical'] for r in runs)}/{len(runs)} | {sum(r['killed'] for r in runs)}/{len(runs)}"
            f" | {', '.join(f'{k} x{n}' for k, n in starts.items())} | {lost} {unit} | {duplicated} {unit} | "
            f"{diff:.3g}{'; failed: ' + failed[0] if failed else ''} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--full", action="store_true", help="the demo recipes as they are (only paths and model)")
    parser.add_argument("--set", action="append", default=[], metavar="JOB:KEY=VALUE", help="one recipe setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed at the end")
    parser.add_argument("--keep", action="store_true", help="keep the trial folders")
    parser.add_argument("--json", type=Path, help="also write every trial's result here")
    args = parser.parse_args()
    jobs = args.jobs.split(",")
    if unknown := set(jobs) - set(JOBS):
        parser.error(f"unknown jobs {sorted(unknown)}; choose from {', '.join(JOBS)}")
    settings = {job: {} if args.full else dict(SHRINK["interpret" if "interpret" in job else job]) for job in JOBS}
    for item in args.set:
        job, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        settings[job][key] = yaml.safe_load(value)
    load_before, started = os.getloadavg(), time.monotonic()
    print(f"soak: {args.trials} trials of {', '.join(jobs)}; model {args.model}; {os.cpu_count()} cores, load "
          f"{' '.join(f'{x:.1f}' for x in load_before)}; OMP_NUM_THREADS={args.threads}; "
          f"{'full demo recipes' if args.full else 'shrunk recipes: ' + json.dumps(settings)}", flush=True)  # fmt: skip
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty: its stores would hold an earlier soak's latents")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="neurolight-soak-"))
    rng = random.Random(args.seed)
    results = []
    try:
        results = run_jobs(jobs, work, args, settings, rng)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(
        f"\n{summary(results)}\n\nmachine: {os.cpu_count()} cores, load average before {load_before[0]:.1f}, after "
        f"{load_after[0]:.1f} (1 min; 15 min {load_after[2]:.1f}); {time.monotonic() - started:.0f} s in all"
    )
    if args.json:
        args.json.write_text(json.dumps({"load": [load_before, load_after], "results": results}, indent=1))


def run_jobs(jobs: list[str], work: Path, args, settings: dict, rng) -> list[dict]:
    from tests.helpers.noida import noida_elasticsearch

    inputs = {"model": args.model, "corpus": work / "corpus"}
    corpus = [*CORPUS, "--num_samples_per_file", str(640 if args.full else SHRINK["corpus"]["num_samples_per_file"])]
    subprocess.run([sys.executable, "-m", "neurolight.cli.tokenize", "--output_dir", str(inputs["corpus"]),
                    "--tokenizer", args.model, *corpus], check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    results, references = [], {}
    needs = {"sample": ["sae"], "interpret-sqlite": ["sae", "sample"], "interpret-es": ["sae", "sample"]}
    (work / "noida").mkdir(parents=True)
    with noida_elasticsearch(work / "noida") as address:
        inputs["es"] = address
        for job in jobs:
            for earlier in [*needs.get(job, []), job]:
                if earlier not in references:
                    references[earlier] = reference(earlier, work, inputs, settings[earlier], args.threads)
                    if earlier == "sae":
                        inputs["sae"] = next(references["sae"][0].glob("*/version_0/checkpoints/last.ckpt"))
                    elif earlier == "sample":
                        inputs["samples"] = references["sample"][0] / "samples"
            for number in range(1, args.trials + 1):
                results.append(trial(job, number, work, inputs, settings[job], references[job], rng, args.threads))
                if not args.keep:
                    shutil.rmtree(work / job / f"trial{number}", ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
