"""SAE training throughput on the demo recipe: neurolight against SAELens, measured in the same run.

    .venv/bin/python bench/sae_throughput.py [--tokens 32768] [--device cpu|cuda] [--repeats 1]
        [--settings same,fastest] [--batch-llm 16] [--batch-sae 512] [--threads 1] [--json FILE]

``--settings`` takes ``same`` (both libraries with the recipe's settings, below), ``fastest`` (each library with its
fastest documented settings) or both, run interleaved. Fastest, neurolight (README, "Fastest settings"):
``llm_dtype: bfloat16``, ``buffer_dtype: bfloat16``, ``compile_llm: true``, ``trainer.precision: bf16-mixed``.
Fastest, SAELens (``LanguageModelSAERunnerConfig``'s documented performance options): a bfloat16 LLM
(``model_from_pretrained_kwargs={"dtype": "bfloat16"}``), ``autocast`` (the SAE step in bf16 autocast),
``autocast_lm``, ``compile_llm`` and ``compile_sae`` (default modes). A fastest setting whose run fails (e.g. a
compilation on a machine without a working inductor) is recorded with its error and the side runs again without it;
``--without compile_sae,...`` leaves settings out from the start. ``prefetch_llm_batches`` (a thread that runs the
next LLM batch while the SAE trains; not in the issue's list) stays off: on CPU it would contend for the same cores.
Compilation happens inside the first forward / step, so the end-to-end tokens/s of a short run includes it; the
"warm" rate uses the median LLM forward and SAE step instead, and the first calls are printed.

Every run also prints the LLM forward's achieved TFLOP/s (the linear layers and attention products up to the site,
``bench/forward_speed.py``'s count, over the median forward) as a fraction of a bf16 matrix product of the model's
own linear shapes at the LLM batch's rows, measured in this process with the same threads before and after the runs
(the ceiling; target of issue 13: >= 60%).

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

Each side runs in its own subprocess (clean peak memory, no shared in-memory caches; inductor's on-disk cache is
shared, so a compilation done by an earlier run is read back faster); with ``--repeats N`` the sides alternate A B B
A ... so that load from other processes hits both alike. Timed per side: the training wall time (from the start of
training, i.e. including the first buffer fill, to the end of the last step; model loading and setup are not
counted, ``--json`` keeps their time), the time inside the LLM forward (neurolight ``HookedLLM.harvest``, SAELens
``ActivationsStore.get_activations``), the time inside the SAE steps (forward, backward, optimizer and the per-step
hooks; on CUDA these two from CUDA events, adding no synchronisation), the rest (buffer, data loading, loop
overhead), peak RSS and, on CUDA, peak allocated memory.

Differences that remain (they do not change the amount of work per token): the SAE details differ as the two
libraries do (neurolight: unit-norm decoder rows re-projected every step, AuxK normalised by the residual variance,
one activation scale estimated on the first buffer; SAELens: decoder norms folded into the TopK, gradient-norm
clipping, ``normalize_activations="none"``, since its norm estimate would cost extra LLM batches); both buffers hold
~8192 activations and serve half of them between refills, but their end effects differ (which refill the last step
falls into), so the LLM forwards run are printed for each side, with a "steady" rate that leaves start-up and end
effects out. In fastest mode, the dtypes differ too: neurolight keeps its buffer in bf16 and SAELens its store in
float32 (the runner's ``dtype``, which is also the SAE's: not a separate setting), and bf16-mixed (Lightning) and
``autocast`` (SAELens) autocast different parts of the step (Lightning the whole training_step, SAELens the SAE forward;
both leave the optimizer in float32). Compilation: neurolight compiles its truncated forward (inductor with frozen
weights and merged products on CPU, CUDA graphs on CUDA) and nothing of the SAE (it has no such option); SAELens
compiles ``run_with_cache`` (the hooked HF forward, stopped by an exception) and the SAE's ``training_forward_pass``.

SAELens runs the Hugging Face forward with a hook that stops it by an exception after the hooked module; neurolight
calls the same modules up to the site itself (``HookedLLM._forward_to_site``, bit-identical activations), which
saves HF's per-call wrappers but not the matrix products: on CPU those are >85% of the time for both sides, so their
throughputs come out close there. On a shared CPU, torch's default of one thread per core suffers
badly from other processes (every parallel region waits for a descheduled thread): pass ``--threads 1`` there for
stable figures. Options: ``--model DIR`` (a Hugging Face model directory; default: the config's model),
``--random-weights`` (only config and tokenizer of ``--model`` are read, the weights are random: same shapes and
cost, for machines without the weights), ``--corpus DIR`` (default: the config's corpus, built into a temporary
directory from the offline pydoc texts if missing), ``--sides neurolight,saelens``, ``--batch-llm N`` (contexts per
LLM forward) and ``--batch-sae N`` (tokens per SAE step; the buffer keeps its number of SAE batches), ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_runs import (
    add_common_options,
    announce,
    apply_batch_sizes,
    load_line,
    load_recipe,
    median,
    parse_common,
    prepare_corpus,
    prepare_model,
    print_notes,
    run_all,
    train_contexts,
    warm_rate,
)
from sae_sides import run_neurolight, run_saelens

SIDES = ("neurolight", "saelens")


# ------------------------------------------------------------------------------------------------- summary
def forward_ceiling(args, recipe: dict, repeats: int = 10) -> dict:
    """FLOPs of one LLM forward up to the site (``bench/forward_speed.py``'s count: the linear layers and attention
    products of the layers up to the hooked one) and the bf16 matmul TFLOP/s of the model's linear shapes at the
    forward's rows, measured here with the children's threads (model built on the meta device: shapes only)."""
    import torch
    from forward_speed import linear_flops, matmul_ceiling  # bench/, beside this script
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    data = recipe["data"]
    seq = int(data["num_tokens"])
    rows = int(data["batch_size_llm"]) * seq
    device = "cuda" if args.device.startswith("cuda") else args.device
    return {
        "flops_per_forward": linear_flops(model, int(data["layer_id"]), rows, seq),
        "ceiling_tflops": matmul_ceiling(model, rows, repeats, device),
        "rows": rows,
    }


def steady_rate(run: dict) -> float:
    """Tokens/s once start-up and end effects are gone: every harvested activation is trained on exactly once."""
    other = max(0.0, run["train_s"] - run["llm_s"] - run["sae_step_s"])
    return 1 / (run["llm_s"] / run["harvested"] + (run["sae_step_s"] + other) / run["tokens"])


def forward_tflops(run: dict, ceiling: dict) -> float:
    """Achieved TFLOP/s of the median LLM forward."""
    return ceiling["flops_per_forward"] / median(run["llm_intervals_s"]) / 1e12


def summarize(results: dict[str, list[dict]], args, ceiling: dict, setting: str) -> None:
    rows = []
    for side, runs in results.items():
        best = min(runs, key=lambda r: r["train_s"])
        rates = [r["tokens"] / r["train_s"] for r in runs]
        other = best["train_s"] - best["llm_s"] - best["sae_step_s"]
        tflops = median([forward_tflops(r, ceiling) for r in runs])
        rows.append(
            {
                "side": side,
                "tok_s": median(rates),
                "tok_s_all": rates,
                "steady": median([steady_rate(r) for r in runs]),
                "warm": median([warm_rate(r) for r in runs]),
                "train_s": best["train_s"],
                "llm": best["llm_s"] / best["train_s"],
                "sae": best["sae_step_s"] / best["train_s"],
                "other": other / best["train_s"],
                "llm_ms": 1000 * median(best["llm_intervals_s"]),
                "step_ms": 1000 * median(best["step_intervals_s"]),
                "first": (best["llm_intervals_s"][0], best["step_intervals_s"][0]),
                "forwards": best["llm_forwards"],
                "tflops": tflops,
                "rss": max(r["peak_rss_mib"] for r in runs),
                "cuda": max((r.get("peak_cuda_mib", float("nan")) for r in runs), default=float("nan")),
                "threads": best["threads"],
                "settings": best["settings"],
            }
        )
    first = next(iter(results.values()))[0]
    print()
    print(
        f"[{setting} settings] SAE training throughput: {args.tokens_trained} tokens ({args.steps} steps of "
        f"{args.batch} tokens), device {args.device}, {len(runs)} run(s) per side, "
        f"torch threads {', '.join(str(r['threads']) for r in rows)}, LLM forward = "
        f"{first['llm_contexts'] // first['llm_forwards']} contexts of {args.context} tokens"
    )
    for r in rows:
        print(f"  {r['side']}: {', '.join(f'{k}={v}' for k, v in r['settings'].items())}")
    header = (
        f"{'side':<11} {'tokens/s':>9} {'steady':>8} {'warm':>8} {'train s':>8} {'LLM fwd':>8} {'SAE step':>9} "
        f"{'other':>6} {'ms/fwd':>7} {'ms/step':>8} {'1st fwd,step s':>15} {'fwds':>5} {'TFLOP/s':>8} "
        f"{'of ceil':>7} {'RSS MiB':>8} {'CUDA MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['side']:<11} {r['tok_s']:>9.1f} {r['steady']:>8.1f} {r['warm']:>8.1f} {r['train_s']:>8.1f} "
            f"{r['llm']:>8.1%} {r['sae']:>9.1%} {r['other']:>6.1%} {r['llm_ms']:>7.1f} {r['step_ms']:>8.2f} "
            f"{r['first'][0]:>7.1f},{r['first'][1]:>7.1f} {r['forwards']:>5d} {r['tflops']:>8.4f} "
            f"{r['tflops'] / ceiling['ceiling_tflops']:>7.1%} {r['rss']:>8.0f} {r['cuda']:>9.0f}"
        )
    by_side = {r["side"]: r for r in rows}
    if len(by_side) == 2:
        ratio = by_side["neurolight"]["tok_s"] / by_side["saelens"]["tok_s"]
        steady = by_side["neurolight"]["steady"] / by_side["saelens"]["steady"]
        warm = by_side["neurolight"]["warm"] / by_side["saelens"]["warm"]
        verdict = "meets" if ratio >= 1.5 else "below"
        print(
            f"neurolight / SAELens ({setting}): {ratio:.2f}x tokens/s ({verdict} the 1.5x target), {steady:.2f}x "
            f"steady, {warm:.2f}x warm"
        )
    for r in rows:
        if len(r["tok_s_all"]) > 1:
            print(f"{r['side']} tokens/s per run: {', '.join(f'{x:.1f}' for x in r['tok_s_all'])}")


def print_legend(ceiling: dict) -> None:
    print(
        "\ntokens/s: trained tokens / training wall time (first buffer fill and any compilation included; model "
        "loading not), median over runs. steady: without start-up and end effects (each harvested activation "
        "trained on once). warm: from the median LLM forward and median SAE step (no compilation or first-call "
        "cost). Shares, ms (medians) and train s are from the fastest run: LLM fwd = inside the LLM forward "
        "(harvest / get_activations), SAE step = forward + backward + optimizer + per-step hooks, other = buffer, "
        "data and loop overhead; 1st fwd,step s = the first LLM forward and SAE step (compilation). fwds = LLM "
        f"forwards run. TFLOP/s: {ceiling['flops_per_forward'] / 1e9:.1f} GFLOP per forward over the median "
        f"forward; of ceil: of the bf16 matmul of the model's linear shapes at {ceiling['rows']} rows, "
        f"{ceiling['ceiling_tflops']:.4f} TFLOP/s (mean of the measurements before and after the runs; target "
        ">= 60%)."
    )


def child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recipe = apply_batch_sizes(load_recipe(args.config), args)
    result = (run_neurolight if args.side == "neurolight" else run_saelens)(args, recipe)
    Path(args.result).write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser, "configs/sae/demo.yaml", 32768)
    parser.add_argument("--sides", default=",".join(SIDES))
    args = parse_common(parser, argv, SIDES)
    if args.side:
        child(args)
        return
    recipe = apply_batch_sizes(load_recipe(args.config), args)
    announce(args, recipe)
    with tempfile.TemporaryDirectory(prefix="sae_throughput_") as tmp:
        workdir = Path(tmp)
        args.workdir = str(workdir)
        args.model = prepare_model(args.model, recipe, args.random_weights, workdir)
        args.corpus = prepare_corpus(recipe, args.corpus, args.model, workdir)
        n_train, length = train_contexts(args.corpus, recipe)
        print(f"[bench] model {args.model}, corpus {args.corpus} ({n_train} training contexts of {length} tokens)")
        ceiling = forward_ceiling(args, recipe)
        print(f"[bench] bf16 matmul ceiling {ceiling['ceiling_tflops']:.4f} TFLOP/s, {load_line()}", flush=True)
        results, fallbacks = run_all(str(Path(__file__).resolve()), args)
        after = forward_ceiling(args, recipe)["ceiling_tflops"]
        print(f"[bench] bf16 matmul ceiling again {after:.4f} TFLOP/s, {load_line()}")
        ceiling["ceiling_tflops_before_after"] = [ceiling["ceiling_tflops"], after]
        ceiling["ceiling_tflops"] = (ceiling["ceiling_tflops"] + after) / 2
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": results, "fallbacks": fallbacks, "ceiling": ceiling}))
        for setting in args.settings:
            summarize(results[setting], args, ceiling, setting)
            print_notes(results[setting], fallbacks, setting)
        print_legend(ceiling)


if __name__ == "__main__":
    main()
