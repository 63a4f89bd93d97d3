"""What ``bench/sae_throughput.py`` and ``bench/sae_sweep.py`` share on the parent's side: the recipe and its batch
sizes, each library's speed settings ("same" or "fastest"), the command-line options, the side subprocesses (with
the fallback that leaves out a fastest setting whose run fails), their order, and the rates read from their results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETTINGS = ("same", "fastest")
# Fastest settings that a failed run leaves out, in this order, before it runs again (compilation is what may not
# work on a given machine; the dtypes and autocast always do).
FALLBACKS = ("compile_sae", "compile_llm")


# --------------------------------------------------------------------------------------------------- setup
def load_recipe(path: str) -> dict:
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    return {
        "seed": config.get("seed_everything", 0),
        "data": data,
        "model": model,
        "class": config["model"]["class_path"],
    }


def apply_batch_sizes(recipe: dict, args) -> dict:
    """The recipe with --batch-llm / --batch-sae (the buffer keeps its number of SAE batches)."""
    if getattr(args, "batch_llm", None):
        recipe["data"]["batch_size_llm"] = args.batch_llm
    if getattr(args, "batch_sae", None):
        recipe["data"]["batch_size_autoencoder"] = args.batch_sae
    return recipe


def side_settings(library: str, setting: str, args, without: set[str] = frozenset()) -> dict:
    """The speed settings of one library's run: the recipe's (``same``, with --llm-dtype and --compile-llm) or the
    library's fastest documented ones (``fastest``), less those in ``without``."""
    fastest = setting == "fastest"
    llm_dtype = "bfloat16" if fastest else args.llm_dtype
    if library == "neurolight":
        settings = {
            "llm_dtype": llm_dtype,
            "buffer_dtype": "bfloat16" if fastest else "float32",
            "compile_llm": fastest or bool(args.compile_llm),
            "precision": "bf16-mixed" if fastest else "32-true",
        }
    else:
        settings = {
            "llm_dtype": llm_dtype,
            "autocast": fastest,
            "autocast_lm": fastest,
            "compile_llm": fastest,
            "compile_sae": fastest,
        }
    for name in without:
        if isinstance(settings.get(name), bool):
            settings[name] = False
    return settings


def prepare_corpus(recipe: dict, corpus: str | None, model_dir: str, workdir: Path) -> str:
    """The corpus to train on: --corpus, else the config's, else one built from pydoc into ``workdir``."""
    from neurolight.datamodules.sae.tokenized_corpus import METADATA_FILE, build_tokenized_corpus

    path = Path(corpus or recipe["data"]["dataset_path"])
    if not path.is_absolute():
        path = ROOT / path
    if (path / METADATA_FILE).is_file():
        return str(path)
    if corpus:
        raise FileNotFoundError(f"--corpus {corpus} is not a tokenized corpus (no {METADATA_FILE})")
    length = int(recipe["data"]["num_tokens"])
    print(f"[bench] {path} is missing; building a pydoc corpus of {length}-token contexts in {workdir}", flush=True)
    built = build_tokenized_corpus(
        workdir / "corpus",
        tokenizer=model_dir,
        min_tokens=length,
        context_length=length,
        num_files=2,
        num_samples_per_file=768,
        num_processes=1,
        overwrite=True,
    )
    return str(built)


def prepare_model(model: str | None, recipe: dict, random_weights: bool, workdir: Path) -> str:
    """A local Hugging Face directory both sides load (SAELens needs a path or hub id, not a short name)."""
    from neurolight.datamodules.llm.models import resolve_model

    path = resolve_model(model or recipe["data"]["model_name"])
    if not random_weights:
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    target = workdir / "random_model"
    llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    llm.save_pretrained(target)
    AutoTokenizer.from_pretrained(path).save_pretrained(target)
    return str(target)


def train_contexts(corpus_dir: str, recipe: dict) -> tuple[int, int]:
    """(number of training contexts, stored context length), as ActivationDataModule splits the corpus."""
    from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus

    corpus = TokenizedCorpus(corpus_dir)
    return len(corpus) - int(recipe["data"].get("val_contexts", 64)), corpus.context_length


# ------------------------------------------------------------------------------------------------- driver
class ChildFailed(RuntimeError):
    """A side's subprocess exited with an error; ``reason`` is the last line of its log (the exception)."""

    def __init__(self, side: str, returncode: int, log: str) -> None:
        lines = [line for line in log.splitlines() if line.strip()]
        self.reason = lines[-1].strip() if lines else f"exit {returncode}"
        super().__init__(f"{side} run failed (exit {returncode}); end of its log:\n{log[-4000:]}")


def library_of(side: str) -> str:
    return "neurolight" if side == "neurolight" else "saelens"


def child_options(args) -> dict:
    """The options every side's subprocess gets from the parent's."""
    return {
        "--config": args.config,
        "--model": args.model,
        "--corpus": args.corpus,
        "--device": args.device,
        "--steps": args.steps,
        "--workdir": args.workdir,
        "--llm-dtype": args.llm_dtype,
        "--threads": args.threads,
        "--batch-llm": args.batch_llm,
        "--batch-sae": args.batch_sae,
        "--compile-llm": args.compile_llm,
    }


def run_child(script: str, side: str, setting: str, options: dict, index: int, without: set[str]) -> dict:
    """Run one side in a subprocess of ``script`` (this file or one that imports it) and read its result."""
    workdir = Path(options["--workdir"])
    result_file = workdir / f"result_{index}_{setting}_{side}.json"
    command = [sys.executable, script, "--side", side, "--setting", setting, "--result", str(result_file)]
    if without:
        command += ["--without", ",".join(sorted(without))]
    for option, value in options.items():
        if value is True:
            command.append(option)
        elif value not in (None, False, "", 0):
            command += [option, str(value)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    start = time.perf_counter()
    log = workdir / f"log_{index}_{setting}_{side}.txt"
    with log.open("w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise ChildFailed(side, proc.returncode, log.read_text())
    result = json.loads(result_file.read_text())
    result["process_s"] = time.perf_counter() - start
    result["notes"] = compile_notes(log.read_text())
    return result


def compile_notes(log: str) -> list[str]:
    """torch.compile's warnings in a side's log that change what runs: a recompile limit hit (the frame then runs
    eager) and its last reason."""
    notes = []
    for line in log.splitlines():
        if "hit config.recompile_limit" in line or "last reason:" in line:
            note = line.split("] ", 2)[-1].strip()  # without the "W1204 11:39:07 ... [25/8]" prefix
            if note not in notes:
                notes.append(note)
    return notes[:6]


def run_with_fallbacks(script, side, setting, options, index, args, without: set[str], fallbacks: list) -> dict:
    """``run_child``; in fastest mode, a failed run is run again without its next compile setting (``FALLBACKS``),
    which ``without`` then keeps for the later repeats; each failure is appended to ``fallbacks``."""
    while True:
        try:
            return run_child(script, side, setting, options, index, without)
        except ChildFailed as error:
            settings = side_settings(library_of(side), setting, args, without)
            left = [name for name in FALLBACKS if settings.get(name)]
            if setting != "fastest" or not left:
                raise
            without.add(left[0])
            fallbacks.append({"side": side, "setting": setting, "left_out": left[0], "error": error.reason})
            print(f"[bench] {side} ({setting}) failed with {left[0]}: {error.reason}; running it without", flush=True)


def run_all(script: str, args, extra_options=None) -> tuple[dict[str, dict[str, list[dict]]], list[dict]]:
    """Every (setting, side) ``args.repeats`` times in A B B A order, each in a subprocess of ``script`` (with the
    fallbacks of ``run_with_fallbacks``), printing each run's tokens/s (x SAEs: aggregate) and the load around it.
    ``extra_options(index, setting, side)`` adds options of the caller's. Returns ``{setting: {side: [results]}}``
    and the fallbacks taken."""
    pairs = [(setting, side) for setting in args.settings for side in args.sides]
    results: dict[str, dict[str, list[dict]]] = {
        setting: {side: [] for side in args.sides} for setting in args.settings
    }
    without = {pair: set(args.without) for pair in pairs}
    fallbacks: list[dict] = []
    for index, (setting, side) in enumerate(interleaved(pairs, args.repeats)):
        options = {**child_options(args), **(extra_options(index, setting, side) if extra_options else {})}
        before = load_line()
        result = run_with_fallbacks(script, side, setting, options, index, args, without[(setting, side)], fallbacks)
        results[setting][side].append(result)
        saes = result.get("saes", 1)
        print(
            f"[bench] {setting} {side}: {result['tokens'] * saes / result['train_s']:.1f} "
            f"{'aggregate ' if saes > 1 else ''}tokens/s ({result['train_s']:.1f} s training, "
            f"{result['process_s']:.1f} s process), {before} -> {load_line()}",
            flush=True,
        )
    return results, fallbacks


def print_notes(results: dict[str, list[dict]], fallbacks: list[dict], setting: str) -> None:
    """What did not run as asked in one setting's runs: fastest settings left out after a failure, and
    torch.compile's recompile limits."""
    for failure in fallbacks:
        if failure["setting"] == setting:
            print(f"left out: {failure['side']} {failure['left_out']}, whose run failed with: {failure['error']}")
    for side, runs in results.items():
        for note in dict.fromkeys(note for run in runs for note in run.get("notes", [])):
            print(f"note, {side}: {note}")


def interleaved(pairs: list, repeats: int) -> list:
    """A B B A ...: the pairs in order, then reversed, ``repeats`` times in all."""
    order: list = []
    for i in range(repeats):
        order += pairs if i % 2 == 0 else pairs[::-1]
    return order


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}/{fifteen:.2f}"


def median(values: list[float]) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def warm_rate(run: dict) -> float:
    """Tokens/s (per SAE) without compilation and other first-call costs: the median LLM forward per harvested
    token, the median batch's SAE step(s) per trained token (SAELens's multi-SAE runner steps each SAE in turn: their
    times are added per batch), plus the rest of the time. Runs one after another (``members``) add their times per
    token."""
    members = run.get("members") or []
    if len(members) > 1:
        return 1 / sum(1 / warm_rate(member) for member in members)
    forwards, steps = run["llm_intervals_s"], run["step_intervals_s"]
    per_batch = len(steps) // run["steps"]
    batches = [sum(steps[i : i + per_batch]) for i in range(0, per_batch * run["steps"], per_batch)]
    other = max(0.0, run["train_s"] - run["llm_s"] - run["sae_step_s"])
    per_token = median(forwards) * len(forwards) / run["harvested"] + median(batches) / (run["tokens"] / run["steps"])
    return 1 / (per_token + other / run["tokens"])


def add_common_options(parser, config: str, tokens: int) -> None:
    """The options this benchmark and ``bench/sae_sweep.py`` share."""
    parser.add_argument("--config", default=str(ROOT / config))
    parser.add_argument("--tokens", type=int, default=tokens, help="training tokens per SAE (rounded up to steps)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the LLM, buffer and SAE all there)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating A B B A ...")
    parser.add_argument("--settings", default="same", help="same, fastest, or same,fastest (see the docstring)")
    parser.add_argument(
        "--without", default="", help="fastest settings to leave out, comma-separated (e.g. compile_sae,compile_llm)"
    )
    parser.add_argument("--model", default=None, help="Hugging Face model directory (default: the config's)")
    parser.add_argument("--random-weights", action="store_true", help="random weights in the model's shapes")
    parser.add_argument("--corpus", default=None, help="tokenized corpus (default: the config's, built if missing)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each side (default: torch's)")
    parser.add_argument("--batch-llm", type=int, default=0, help="contexts per LLM forward (default: the config's)")
    parser.add_argument("--batch-sae", type=int, default=0, help="tokens per SAE step (default: the config's)")
    parser.add_argument(
        "--llm-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="same settings: the LLM's weights on both sides (the SAE and its activations stay float32)",
    )
    parser.add_argument(
        "--compile-llm",
        action="store_true",
        help="same settings, neurolight side: torch.compile its truncated LLM forward (CUDA graphs on CUDA)",
    )
    parser.add_argument("--json", default=None, help="also write every run's measurements to this file")
    # Internal: one side in a subprocess.
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)


def parse_common(parser, argv, sides: tuple[str, ...]):
    """Parse; in the parent, check the settings and the device and set steps, tokens and batch sizes."""
    args = parser.parse_args(argv)
    args.without = [name.strip() for name in args.without.split(",") if name.strip()]
    if args.side:
        return args
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not args.settings or any(s not in SETTINGS for s in args.settings):
        parser.error(f"--settings takes a comma-separated subset of {', '.join(SETTINGS)}")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or any(s not in sides for s in args.sides):
        parser.error(f"--sides takes a comma-separated subset of {', '.join(sides)}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")
    recipe = apply_batch_sizes(load_recipe(args.config), args)
    args.batch = int(recipe["data"]["batch_size_autoencoder"])
    args.context = int(recipe["data"]["num_tokens"])
    args.steps = max(1, math.ceil(args.tokens / args.batch))
    args.tokens_trained = args.steps * args.batch
    return args


def announce(args, recipe: dict) -> None:
    """The machine, its load and the batch sizes used."""
    print(f"[bench] {platform.node()}: {load_line()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    data = recipe["data"]
    print(
        f"[bench] batch sizes: {data['batch_size_llm']} contexts x {data['num_tokens']} tokens per LLM forward, "
        f"{data['batch_size_autoencoder']} tokens per SAE step, buffer {data['num_batches_preload']} SAE batches"
    )
    if args.device == "cpu" and not args.threads and os.getloadavg()[0] >= (os.cpu_count() or 1):
        print(
            "[bench] other processes load the CPUs: with torch's default threads the timings are mostly contention; "
            "--threads 1 gives stable figures",
            flush=True,
        )
