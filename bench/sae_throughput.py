"""SAE training throughput on the demo recipe: neurolight against SAELens, measured in the same run.

    .venv/bin/python bench/sae_throughput.py [--tokens 32768] [--device cpu|cuda] [--repeats 1]

Both sides train the same SAE (576 -> 2304 TopK, k=32, float32) on the same activations (SmolLM2-135M-Instruct,
output of ``model.layers.15.mlp``, position 0 of every context excluded) for the same number of tokens, with the
same batch sizes (16 contexts of 64 tokens per LLM forward, 512 tokens per SAE step), the same mixing-buffer size
in tokens, the same training contexts in the same order, no validation, no checkpoints and no logging backend:

- neurolight: ``ActivationDataModule`` + ``SparseAutoencoderModule`` built from ``configs/sae/demo.yaml``, trained
  by a Lightning ``Trainer`` with that config's settings (the config's checkpoint, resampling and progress-bar
  callbacks, its logger and its validation are left out).
- SAELens (PyPI ``sae-lens``): its full runner ``LanguageModelSAETrainingRunner`` with ``model_class_name=
  "AutoModelForCausalLM"`` on the same local model directory, the corpus as a pretokenized in-memory
  ``datasets.Dataset``, wandb off, no checkpoints, no evals, no output written.

Each side runs in its own subprocess (clean peak memory, no shared caches); with ``--repeats N`` the sides
alternate A B B A ... so that load from other processes hits both alike. Timed per side: the training wall time
(from the start of training, i.e. including the first buffer fill, to the end of the last step; model loading
and setup are not counted, ``--json`` keeps their time), the time inside the LLM forward (neurolight
``HookedLLM.harvest``, SAELens ``ActivationsStore.get_activations``), the time inside the SAE steps (forward,
backward, optimizer and the per-step hooks; on CUDA these two from CUDA events, adding no synchronisation), the
rest (buffer, data loading, loop overhead), peak RSS and, on CUDA, peak allocated memory.

Differences that remain (they do not change the amount of work per token): the SAE details differ as the two
libraries do (neurolight: unit-norm decoder rows re-projected every step, AuxK normalised by the residual variance,
one activation scale estimated on the first buffer; SAELens: decoder norms folded into the TopK, gradient-norm
clipping, ``normalize_activations="none"``, since its norm estimate would cost extra LLM batches); both buffers
hold ~8192 activations and serve half of them between refills, but their end effects differ (which refill the last
step falls into), so the LLM forwards run are printed for each side, with a "steady" rate that leaves start-up and
end effects out.

SAELens runs the Hugging Face forward with a hook that stops it by an exception after the hooked module; neurolight
calls the same modules up to the site itself (``HookedLLM._forward_to_site``, bit-identical activations), which
saves HF's per-call wrappers but not the matrix products: on CPU those are >85% of the time for both sides, so their
throughputs come out close there. On a shared CPU, torch's default of one thread per core suffers
badly from other processes (every parallel region waits for a descheduled thread): pass ``--threads 1`` there for
stable figures. Options: ``--model DIR`` (a Hugging Face model directory; default: the config's model),
``--random-weights`` (only config and tokenizer of ``--model`` are read, the weights are random: same shapes and
cost, for machines without the weights), ``--corpus DIR`` (default: the config's corpus, built into a temporary
directory from the offline pydoc texts if missing), ``--sides neurolight,saelens``, ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIDES = ("neurolight", "saelens")


# --------------------------------------------------------------------------------------------------- setup
def load_recipe(path: str) -> dict:
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    return {"seed": config.get("seed_everything", 0), "data": data, "model": model}


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


# ---------------------------------------------------------------------------------------------- measuring
class Clock:
    """Time inside the LLM forward and inside the SAE steps.

    On CPU, wall-clock intervals. On CUDA, intervals between CUDA events recorded on the stream, read once at the
    end, so that measuring adds no synchronisation (a synchronize per step would change what is measured); the
    total training time is wall-clock on both (one synchronize at each end).
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.llm: list = []  # (start, end) marks of every LLM forward
        self.llm_in_step: list = []  # those inside a step (none expected): LLM time, not SAE time
        self.step: list = []
        self.llm_contexts = 0
        self.active = False
        self.in_step = False
        self._step_start = None

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wall(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def _seconds(self, intervals: list) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in intervals) / 1000
        return sum(end - start for start, end in intervals)

    @property
    def llm_s(self) -> float:
        return self._seconds(self.llm)

    @property
    def step_s(self) -> float:
        return self._seconds(self.step) - self._seconds(self.llm_in_step)

    @property
    def llm_calls(self) -> int:
        return len(self.llm)

    def wrap_llm(self, fn):
        clock = self

        def timed(*args, **kwargs):
            if not clock.active:
                return fn(*args, **kwargs)
            start = clock.mark()
            out = fn(*args, **kwargs)
            interval = (start, clock.mark())
            clock.llm.append(interval)
            if clock.in_step:
                clock.llm_in_step.append(interval)
            clock.llm_contexts += int(out.shape[0])  # (contexts, positions, d_in) on both sides
            return out

        return timed

    def step_start(self) -> None:
        self.in_step = True
        self._step_start = self.mark()

    def step_end(self) -> None:
        self.step.append((self._step_start, self.mark()))
        self.in_step = False


def memory_report(device: str) -> dict:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        import torch

        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def side_result(side: str, steps: int, batch_sae: int, marks: dict, t_setup: float, clock, positions: int, device):
    """One side's figures, in the same keys for both tools."""
    return {
        "side": side,
        "steps": steps,
        "tokens": steps * batch_sae,
        "train_s": marks["end"] - marks["start"],
        "setup_s": marks["start"] - t_setup,
        "llm_s": clock.llm_s,
        "sae_step_s": clock.step_s,
        "llm_forwards": clock.llm_calls,
        "llm_contexts": clock.llm_contexts,
        "harvested": clock.llm_contexts * positions,
        "threads": marks["threads"],
        "rss_before_train_mib": marks["rss_before_train_mib"],
        **memory_report(device),
    }


# --------------------------------------------------------------------------------------------- neurolight
def run_neurolight(args, recipe: dict) -> dict:
    import lightning.pytorch as pl
    import torch

    from neurolight.datamodules import ActivationDataModule
    from neurolight.datamodules.llm.hooked import HookedLLM
    from neurolight.lightning_modules import SparseAutoencoderModule

    t_setup = time.perf_counter()
    data, model = recipe["data"], recipe["model"]
    clock = Clock(args.device)
    HookedLLM.harvest = clock.wrap_llm(HookedLLM.harvest)
    pl.seed_everything(recipe["seed"], verbose=False)
    datamodule = ActivationDataModule(
        **{
            **data,
            "dataset_path": args.corpus,
            "model_name": args.model,
            "device_llm": args.device,
            "llm_dtype": args.llm_dtype,
            "compile_llm": args.compile_llm or bool(data.get("compile_llm", False)),
        }
    )
    module = SparseAutoencoderModule(**model)
    steps = args.steps
    positions = int(data["num_tokens"]) - int(bool(data.get("exclude_first_position", True)))
    marks: dict[str, float] = {}

    class Timer(pl.Callback):
        # on_fit_start: after setup (model loading), before Lightning fetches the first batch (buffer fill).
        def on_fit_start(self, trainer, pl_module):
            marks["rss_before_train_mib"] = rss_mib()
            marks["threads"] = torch.get_num_threads()
            clock.active = True
            marks["start"] = clock.wall()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.step_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.step_end()

        def on_train_end(self, trainer, pl_module):
            marks["end"] = clock.wall()
            clock.active = False

    trainer = pl.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        callbacks=[Timer()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        default_root_dir=args.workdir,
    )
    marks["fit_called"] = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    if trainer.global_step != steps:
        raise RuntimeError(f"neurolight trained {trainer.global_step} steps, expected {steps}")
    batch_sae = int(data["batch_size_autoencoder"])
    return side_result("neurolight", steps, batch_sae, marks, t_setup, clock, positions, args.device)


# ------------------------------------------------------------------------------------------------ SAELens
def run_saelens(args, recipe: dict) -> dict:
    import logging

    import datasets
    import torch

    from neurolight.datamodules.llm.hooked import HOOK_POINTS
    from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus

    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    import sae_lens.llm_sae_training_runner as runner_module
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.sae_trainer import SAETrainer

    t_setup = time.perf_counter()
    data, model = recipe["data"], recipe["model"]
    seed = recipe["seed"]
    num_tokens = int(data["num_tokens"])
    batch_sae = int(data["batch_size_autoencoder"])
    skip_first = bool(data.get("exclude_first_position", True))
    positions = num_tokens - int(skip_first)
    # neurolight's buffer holds num_batches_preload * batch_size_autoencoder activations; SAELens's mixing buffer
    # holds n_batches_in_buffer * (positions kept per context) of them.
    buffer_rows = int(data["num_batches_preload"]) * batch_sae
    n_batches_in_buffer = max(1, round(buffer_rows / positions))

    # The training contexts in the order neurolight reads them in its first pass over the corpus.
    corpus = TokenizedCorpus(args.corpus)
    n_train = len(corpus) - int(data.get("val_contexts", 64))
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003))
    ids = corpus.batch(order.numpy())[:, :num_tokens]
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})

    clock = Clock(args.device)
    ActivationsStore.get_activations = clock.wrap_llm(ActivationsStore.get_activations)
    marks: dict[str, float] = {}
    fit, step = SAETrainer.fit, SAETrainer.step

    def timed_fit(self):
        marks["rss_before_train_mib"] = rss_mib()
        marks["threads"] = torch.get_num_threads()
        clock.active = True
        marks["start"] = clock.wall()
        try:
            return fit(self)
        finally:
            marks["end"] = clock.wall()
            clock.active = False
            marks["steps"] = self.n_training_steps

    def timed_step(self, batch):
        clock.step_start()
        out = step(self, batch)
        clock.step_end()
        return out

    SAETrainer.fit, SAETrainer.step = timed_fit, timed_step
    # The step does not include maybe_reset_sparsity / pbar updates, which the loop does around it: they land in
    # "other", as Lightning's loop overhead does on the neurolight side.
    dead_window = max(1, int(model.get("dead_tokens_threshold", 10_000_000)) // batch_sae - 1)
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(
            d_in=int(model["act_vec_size"]),
            d_sae=int(model["dict_vec_size"]),
            k=int(model["architecture"]["init_args"]["k"]),
            dtype="float32",
            device=args.device,
            normalize_activations="none",
        ),
        model_name=args.model,
        model_class_name="AutoModelForCausalLM",
        model_from_pretrained_kwargs={"dtype": args.llm_dtype},
        hook_name=HOOK_POINTS[data["layer_type"]].format(int(data["layer_id"])),
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=num_tokens,
        seqpos_slice=(1, None) if skip_first else (None,),
        n_batches_in_buffer=n_batches_in_buffer,
        training_tokens=args.steps * batch_sae,
        store_batch_size_prompts=int(data["batch_size_llm"]),
        train_batch_size_tokens=batch_sae,
        device=args.device,
        seed=seed,
        dtype="float32",
        lr=float(model.get("learning_rate", 2e-4)),
        lr_warm_up_steps=int(model.get("lr_warmup_steps", 0)),
        adam_beta1=float(model.get("adam_betas", (0.9, 0.999))[0]),
        adam_beta2=float(model.get("adam_betas", (0.9, 0.999))[1]),
        dead_feature_window=dead_window,
        feature_sampling_window=10**9,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=None,
        verbose=False,
    )
    if data["layer_type"] != "mlp_sublayer" and data["layer_type"] != "attn_sublayer":
        raise ValueError("the SAELens side reads module outputs: use layer_type mlp_sublayer or attn_sublayer")
    torch.manual_seed(seed)
    runner = runner_module.LanguageModelSAETrainingRunner(cfg, override_dataset=dataset)
    runner.run()
    if marks.get("steps") != args.steps:
        raise RuntimeError(f"SAELens trained {marks.get('steps')} steps, expected {args.steps}")
    result = side_result("saelens", args.steps, batch_sae, marks, t_setup, clock, positions, args.device)
    return {**result, "n_batches_in_buffer": n_batches_in_buffer}


# ------------------------------------------------------------------------------------------------- driver
def child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.config)
    result = (run_neurolight if args.side == "neurolight" else run_saelens)(args, recipe)
    Path(args.result).write_text(json.dumps(result))


def run_side(side: str, args, workdir: Path, index: int) -> dict:
    result_file = workdir / f"result_{index}_{side}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--side",
        side,
        "--result",
        str(result_file),
        "--config",
        args.config,
        "--model",
        args.model,
        "--corpus",
        args.corpus,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--workdir",
        str(workdir),
        "--llm-dtype",
        args.llm_dtype,
    ]
    if args.compile_llm:
        command.append("--compile-llm")
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    start = time.perf_counter()
    log = workdir / f"log_{index}_{side}.txt"
    with log.open("w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{side} run failed (exit {proc.returncode}); end of its log:\n{tail}")
    result = json.loads(result_file.read_text())
    result["process_s"] = time.perf_counter() - start
    return result


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def steady_rate(run: dict) -> float:
    """Tokens/s once start-up and end effects are gone: every harvested activation is trained on exactly once."""
    other = max(0.0, run["train_s"] - run["llm_s"] - run["sae_step_s"])
    return 1 / (run["llm_s"] / run["harvested"] + (run["sae_step_s"] + other) / run["tokens"])


def summarize(results: dict[str, list[dict]], args) -> None:
    rows = []
    for side, runs in results.items():
        best = min(runs, key=lambda r: r["train_s"])
        rates = [r["tokens"] / r["train_s"] for r in runs]
        other = best["train_s"] - best["llm_s"] - best["sae_step_s"]
        rows.append(
            {
                "side": side,
                "tok_s": median(rates),
                "tok_s_all": rates,
                "steady": median([steady_rate(r) for r in runs]),
                "train_s": best["train_s"],
                "llm": best["llm_s"] / best["train_s"],
                "sae": best["sae_step_s"] / best["train_s"],
                "other": other / best["train_s"],
                "llm_ms": 1000 * best["llm_s"] / max(1, best["llm_forwards"]),
                "step_ms": 1000 * best["sae_step_s"] / max(1, best["steps"]),
                "forwards": best["llm_forwards"],
                "rss": max(r["peak_rss_mib"] for r in runs),
                "cuda": max((r.get("peak_cuda_mib", float("nan")) for r in runs), default=float("nan")),
                "threads": best["threads"],
            }
        )
    first = next(iter(results.values()))[0]
    print()
    print(
        f"SAE training throughput: {args.tokens_trained} tokens ({args.steps} steps of {args.batch} tokens), "
        f"device {args.device}, {len(next(iter(results.values())))} run(s) per side, torch threads "
        f"{', '.join(str(r['threads']) for r in rows)}, LLM forward = {first['llm_contexts'] // first['llm_forwards']}"
        f" contexts"
    )
    header = (
        f"{'side':<11} {'tokens/s':>9} {'steady':>8} {'train s':>8} {'LLM fwd':>8} {'SAE step':>9} {'other':>6} "
        f"{'ms/fwd':>7} {'ms/step':>8} {'fwds':>5} {'peak RSS MiB':>13} {'peak CUDA MiB':>14}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['side']:<11} {r['tok_s']:>9.1f} {r['steady']:>8.1f} {r['train_s']:>8.1f} {r['llm']:>8.1%} "
            f"{r['sae']:>9.1%} {r['other']:>6.1%} {r['llm_ms']:>7.1f} {r['step_ms']:>8.2f} {r['forwards']:>5d} "
            f"{r['rss']:>13.0f} {r['cuda']:>14.0f}"
        )
    by_side = {r["side"]: r for r in rows}
    if len(by_side) == 2:
        ratio = by_side["neurolight"]["tok_s"] / by_side["saelens"]["tok_s"]
        steady = by_side["neurolight"]["steady"] / by_side["saelens"]["steady"]
        verdict = "meets" if ratio >= 1.5 else "below"
        print(f"\nneurolight / SAELens: {ratio:.2f}x tokens/s ({verdict} the 1.5x target), {steady:.2f}x steady state")
    for r in rows:
        if len(r["tok_s_all"]) > 1:
            print(f"{r['side']} tokens/s per run: {', '.join(f'{x:.1f}' for x in r['tok_s_all'])}")
    print(
        "tokens/s: trained tokens / training wall time (first buffer fill included; model loading not), median over "
        "runs. steady: the same rate without start-up and end effects (each harvested activation trained on once). "
        "Shares, ms and train s are from the fastest run: LLM fwd = inside the LLM forward (harvest / "
        "get_activations), SAE step = forward + backward + optimizer + per-step hooks, other = buffer, data and "
        "loop overhead. fwds = LLM forwards run (end effects differ)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/sae/demo.yaml"))
    parser.add_argument("--tokens", type=int, default=32768, help="training tokens per side (rounded up to steps)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the LLM, buffer and SAE all there)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating A B B A ...")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--model", default=None, help="Hugging Face model directory (default: the config's)")
    parser.add_argument("--random-weights", action="store_true", help="random weights in the model's shapes")
    parser.add_argument("--corpus", default=None, help="tokenized corpus (default: the config's, built if missing)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each side (default: torch's)")
    parser.add_argument(
        "--llm-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the LLM's weights on both sides (the SAE and its activations stay float32)",
    )
    parser.add_argument(
        "--compile-llm",
        action="store_true",
        help="neurolight side: torch.compile its truncated LLM forward (CUDA graphs on CUDA); SAELens has none",
    )
    parser.add_argument("--json", default=None, help="also write every run's measurements to this file")
    # Internal: one side in a subprocess.
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        child(args)
        return

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in SIDES for s in sides):
        parser.error(f"--sides takes a comma-separated subset of {', '.join(SIDES)}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")
    recipe = load_recipe(args.config)
    args.batch = int(recipe["data"]["batch_size_autoencoder"])
    args.steps = max(1, math.ceil(args.tokens / args.batch))
    args.tokens_trained = args.steps * args.batch
    load = os.getloadavg()
    print(f"[bench] {platform.node()}: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs")
    if args.device == "cpu" and not args.threads and load[0] >= (os.cpu_count() or 1):
        print(
            "[bench] other processes load the CPUs: with torch's default threads the timings are mostly contention; "
            "--threads 1 gives stable figures",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="sae_throughput_") as tmp:
        workdir = Path(tmp)
        args.model = prepare_model(args.model, recipe, args.random_weights, workdir)
        args.corpus = prepare_corpus(recipe, args.corpus, args.model, workdir)
        n_train, length = train_contexts(args.corpus, recipe)
        print(f"[bench] model {args.model}, corpus {args.corpus} ({n_train} training contexts of {length} tokens)")
        order: list[str] = []
        for i in range(args.repeats):
            order += sides if i % 2 == 0 else sides[::-1]
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for index, side in enumerate(order):
            result = run_side(side, args, workdir, index)
            results[side].append(result)
            print(
                f"[bench] {side}: {result['tokens'] / result['train_s']:.1f} tokens/s "
                f"({result['train_s']:.1f} s training, {result['process_s']:.1f} s process), "
                f"load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        summarize(results, args)


if __name__ == "__main__":
    main()
