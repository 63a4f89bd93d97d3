"""A sweep of 8 TopK SAEs: neurolight's one run against SAELens, throughput and held-out quality, in the same run.

    .venv/bin/python bench/sae_sweep.py [--tokens 16384] [--threads 1] [--repeats 1] [--device cpu|cuda]
        [--settings same|fastest] [--sides neurolight,saelens-multi,saelens-seq] [--eval-contexts 128]
        [--batch-llm 16] [--batch-sae 512] [--json FILE]

The sweep of ``configs/sae/sweep-demo.yaml`` (SmolLM2-135M-Instruct, output of ``model.layers.15.mlp``, TopK with
k in {16, 32, 64, 128} x d_sae in {2304, 4608}, lr 1e-3 with 20 warm-up steps, 16 contexts of 64 tokens per LLM
forward, 512 tokens per SAE step, an 8192-activation buffer) trained for ``--tokens`` tokens per SAE by three sides,
each in its own subprocess, in A B C C B A order with ``--repeats``:

- ``neurolight``: ``SparseAutoencoderSweep`` (one LLM forward and one backward for all 8) with the recipe's data
  module, in a Lightning ``Trainer`` (no validation, checkpoints, resampling or logger), as
  ``bench/sae_throughput.py`` trains the single SAE;
- ``saelens-seq``: SAELens's ``LanguageModelSAETrainingRunner``, the 8 SAEs one after another in one process (the
  model reloaded by each runner, as 8 runs of its CLI would; loading is not timed);
- ``saelens-multi``: SAELens's ``MultiSAETrainingRunner`` (one shared LLM forward, one ``SAETrainer`` step per SAE).

Every side gets the same contexts in the same order (SAELens: a pretokenized dataset in neurolight's order), the same
k, d_sae, lr, warm-up, Adam betas, batch sizes, buffer size (in activations) and tokens; wandb, checkpoints and evals
off. Printed: the aggregate tokens/s (tokens x SAEs / training wall time), end to end and "warm" (from the median
LLM forward and median SAE step: without compilation), the shares of the LLM forward and the SAE steps, and the
ratios neurolight / SAELens sequential (target of issue 13: >= 4x) and neurolight / MultiSAETrainingRunner (>= 1.5x).

Quality (issue 13, item 4): the last ``--eval-contexts`` contexts of the corpus are held out of training on every
side (the data module's ``val_contexts``), their activations harvested once, in float32, by neurolight's
``HookedLLM`` (position 0 left out, as in training). Every SAE of the first run of each side is read back by
``SparseAutoencoder.from_pretrained`` (neurolight's sweep checkpoint by member name, SAELens's output directories;
both with any normalisation folded into the weights) and scored by the same code on those activations: explained
variance 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all held-out tokens (neurolight's
``ExplainedVariance``) and L0. Target: neurolight's EV at each (k, d_sae) >= SAELens's - 0.01.

What still differs (besides ``bench/sae_throughput.py``'s list: decoder-norm handling, AuxK, grad-norm clipping,
neurolight's activation scale against SAELens's ``normalize_activations="none"``, buffer end effects):
``MultiSAETrainingRunner`` does not support ``compile_sae`` (left out in fastest mode, printed) and keeps the LLM's
dtype in its store (a bf16 LLM gives bf16 activations); the sequential SAELens side repeats the first buffer fill for
every SAE (it is part of its cost); neurolight sums the 8 losses into one backward and steps one Adam with a group per
SAE (each SAE still gets its own loss's gradient and its own Adam state), SAELens steps 8 optimizers. At a few
thousand tokens (a CPU-sized run: 16-32 steps, inside the 20-step warm-up) the EVs say whether the two train alike
from the same start, not what either reaches; the init differs (neurolight: decoder rows of unit norm, the encoder tied
at the least-squares scale of docs/sae.md, Initialisation; SAELens: decoder rows of norm 0.1, the encoder tied to them,
decoder norms folded into the TopK selection).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sae_runs
import sae_sides

SIDES = ("neurolight", "saelens-multi", "saelens-seq")
TARGETS = {"saelens-seq": 4.0, "saelens-multi": 1.5}


def sweep_recipe(args) -> dict:
    """The sweep recipe with the batch sizes of the command line and ``--eval-contexts`` held out."""
    recipe = sae_runs.apply_batch_sizes(sae_runs.load_recipe(args.config), args)
    recipe["data"]["val_contexts"] = args.eval_contexts
    return recipe


# ------------------------------------------------------------------------------------------------ SAELens
def run_saelens_multi(args, recipe: dict) -> dict:
    """The recipe's SAEs in one ``MultiSAETrainingRunner``; with ``args.output``, saved into ``args.output/NAME``."""
    import torch
    from sae_lens import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    t_setup = time.perf_counter()
    hook_name = sae_sides.saelens_setup(recipe)
    data = recipe["data"]
    settings = sae_runs.side_settings("saelens", args.setting, args, set(args.without))
    settings["compile_sae"] = False  # not supported by MultiSAETrainingRunner (its docstring: V1 limitations)
    dataset = sae_sides.saelens_dataset(args, recipe)
    timer = sae_sides.SaelensTimer(args.device)
    members = sae_sides.saelens_members(recipe)
    cfg = MultiSAETrainingRunnerConfig(
        saes={name: sae_sides.saelens_sae_config(args, recipe, d_sae, k) for name, (d_sae, k) in members.items()},
        hook_names=hook_name,
        **sae_sides.saelens_config(args, recipe, settings, args.output),
    )
    torch.manual_seed(recipe["seed"])
    MultiSAETrainingRunner(cfg, override_dataset=dataset).run()
    if timer.marks.get("steps") != args.steps:
        raise RuntimeError(f"SAELens trained {timer.marks.get('steps')} steps, expected {args.steps}")
    positions = int(data["num_tokens"]) - int(bool(data.get("exclude_first_position", True)))
    batch_sae = int(data["batch_size_autoencoder"])
    result = sae_sides.side_result(
        "saelens-multi", args.steps, batch_sae, timer.marks, t_setup, timer.clock, positions, args.device
    )
    return {**result, "settings": settings}


def child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recipe = sweep_recipe(args)
    run = {
        "neurolight": sae_sides.run_neurolight,
        "saelens-seq": sae_sides.run_saelens,
        "saelens-multi": run_saelens_multi,
    }[args.side]
    result = run(args, recipe)
    Path(args.result).write_text(
        json.dumps({**result, "side": args.side, "saes": len(sae_sides.saelens_members(recipe))})
    )


# ------------------------------------------------------------------------------------------------ quality
def held_out_activations(args, recipe: dict):
    """(tokens, d_in) float32 activations of the held-out contexts (the corpus's last ``val_contexts``), from a
    float32 LLM, position 0 left out as in training."""
    import torch

    from neurolight.datamodules.llm.hooked import HookedLLM
    from neurolight.datamodules.llm.models import load_causal_lm
    from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus

    data = recipe["data"]
    corpus = TokenizedCorpus(args.corpus)
    held_out = range(len(corpus) - int(data["val_contexts"]), len(corpus))
    device = args.device
    hooked = HookedLLM(
        load_causal_lm(args.model, dtype=torch.float32, device=device), data["layer_type"], data["layer_id"]
    )
    skip = int(bool(data.get("exclude_first_position", True)))
    batch = int(data["batch_size_llm"])
    ids = torch.as_tensor(corpus.batch(list(held_out))[:, : int(data["num_tokens"])])
    with torch.no_grad():
        acts = [hooked.harvest(ids[i : i + batch].to(device))[:, skip:] for i in range(0, len(ids), batch)]
    return torch.cat(acts).reshape(-1, acts[0].shape[-1]).float()


def evaluate(source: str, name: str | None, x) -> dict:
    """Explained variance (over all rows) and L0 of the SAE at ``source`` on activations ``x`` (rows, d_in)."""
    import torch

    from neurolight.lightning_modules.sae.metrics import ExplainedVariance
    from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

    sae = SparseAutoencoder.from_pretrained(source, name).to(x.device)
    explained, active = ExplainedVariance().to(x.device), 0
    with torch.no_grad():
        for chunk in x.split(4096):
            latents = sae.encode(chunk.to(sae.W_enc.dtype))
            explained.update(chunk, sae.decode(latents))
            active += int((latents > 0).sum())
    return {"explained_variance": float(explained.compute()), "l0": active / len(x)}


def quality(args, recipe: dict, outputs: dict) -> dict:
    """{setting: {side: {sae name: metrics}}} for the SAEs saved at ``outputs[(setting, side)]``."""
    x = held_out_activations(args, recipe)
    print(f"[bench] held-out activations: {len(x)} tokens from the last {recipe['data']['val_contexts']} contexts")
    scores: dict = {}
    for (setting, side), output in outputs.items():
        for name in sae_sides.saelens_members(recipe):
            source, member = (output, name) if side == "neurolight" else (str(Path(output) / name), None)
            scores.setdefault(setting, {}).setdefault(side, {})[name] = evaluate(source, member, x)
    return {"tokens": len(x), "scores": scores}


# ------------------------------------------------------------------------------------------------ summary
def summarize(results: dict[str, list[dict]], args, setting: str, fallbacks: list[dict]) -> None:
    rows = {}
    for side, runs in results.items():
        best = min(runs, key=lambda r: r["train_s"])
        saes = best["saes"]
        rows[side] = {
            "saes": saes,
            "agg": sae_runs.median([r["tokens"] * saes / r["train_s"] for r in runs]),
            "agg_all": [r["tokens"] * saes / r["train_s"] for r in runs],
            "warm": sae_runs.median([sae_runs.warm_rate(r) * saes for r in runs]),
            "train_s": best["train_s"],
            "llm": best["llm_s"] / best["train_s"],
            "sae": best["sae_step_s"] / best["train_s"],
            "forwards": best["llm_forwards"],
            "first": (best["llm_intervals_s"][0], best["step_intervals_s"][0]),
            "rss": max(r["peak_rss_mib"] for r in runs),
            "settings": best["settings"],
        }
    print(
        f"\n[{setting} settings] sweep of {next(iter(rows.values()))['saes']} SAEs, {args.tokens_trained} tokens per "
        f"SAE ({args.steps} steps of {args.batch}), device {args.device}, {len(next(iter(results.values())))} run(s) "
        f"per side, threads {args.threads or 'default'}"
    )
    for side, r in rows.items():
        print(f"  {side}: {', '.join(f'{k}={v}' for k, v in r['settings'].items())}")
    header = (
        f"{'side':<14} {'SAEs':>4} {'agg tokens/s':>12} {'warm':>9} {'train s':>8} {'LLM fwd':>8} {'SAE steps':>9} "
        f"{'fwds':>5} {'1st fwd,step s':>15} {'RSS MiB':>8}"
    )
    print(header)
    print("-" * len(header))
    for side, r in rows.items():
        print(
            f"{side:<14} {r['saes']:>4d} {r['agg']:>12.1f} {r['warm']:>9.1f} {r['train_s']:>8.1f} {r['llm']:>8.1%} "
            f"{r['sae']:>9.1%} {r['forwards']:>5d} {r['first'][0]:>7.1f},{r['first'][1]:>7.1f} {r['rss']:>8.0f}"
        )
    if "neurolight" in rows:
        for side, target in TARGETS.items():
            if side in rows:
                ratio = rows["neurolight"]["agg"] / rows[side]["agg"]
                warm = rows["neurolight"]["warm"] / rows[side]["warm"]
                verdict = "meets" if ratio >= target else "below"
                print(f"neurolight / {side}: {ratio:.2f}x ({verdict} the {target}x target), {warm:.2f}x warm")
    for side, r in rows.items():
        if len(r["agg_all"]) > 1:
            print(f"{side} aggregate tokens/s per run: {', '.join(f'{x:.1f}' for x in r['agg_all'])}")
    sae_runs.print_notes(results, fallbacks, setting)


def print_quality(report: dict, recipe: dict) -> None:
    members = sae_sides.saelens_members(recipe)
    for setting, by_side in report["scores"].items():
        sides = list(by_side)
        print(
            f"\n[{setting} settings] held-out quality, {report['tokens']} tokens, one evaluator "
            f"(EV = 1 - sum||x - x_hat||^2 / sum||x - mean||^2; L0 = mean active latents)"
        )
        header = f"{'SAE':<12} {'k':>4} {'d_sae':>6} " + " ".join(f"{'EV ' + s:>17}" for s in sides)
        header += " " + " ".join(f"{'L0 ' + s:>17}" for s in sides)
        if "neurolight" in by_side and len(sides) > 1:
            header += f" {'EV nl - best SL':>16}"
        print(header)
        print("-" * len(header))
        worst = None
        for name, (d_sae, k) in members.items():
            line = f"{name:<12} {k:>4d} {d_sae:>6d} "
            line += " ".join(f"{by_side[s][name]['explained_variance']:>17.4f}" for s in sides)
            line += " " + " ".join(f"{by_side[s][name]['l0']:>17.1f}" for s in sides)
            if "neurolight" in by_side and len(sides) > 1:
                best = max(by_side[s][name]["explained_variance"] for s in sides if s != "neurolight")
                gap = by_side["neurolight"][name]["explained_variance"] - best
                worst = gap if worst is None else min(worst, gap)
                line += f" {gap:>+16.4f}"
            print(line)
        if worst is not None:
            verdict = "meets" if worst >= -0.01 else "below"
            print(f"worst EV gap neurolight - best SAELens: {worst:+.4f} ({verdict} the >= -0.01 target)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sae_runs.add_common_options(parser, "configs/sae/sweep-demo.yaml", 16384)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--eval-contexts", type=int, default=128, help="contexts held out of training for quality")
    args = sae_runs.parse_common(parser, argv, SIDES)
    if args.side:
        child(args)
        return
    recipe = sweep_recipe(args)
    sae_runs.announce(args, recipe)
    with tempfile.TemporaryDirectory(prefix="sae_sweep_") as tmp:
        workdir = Path(tmp)
        args.workdir = str(workdir)
        args.model = sae_runs.prepare_model(args.model, recipe, args.random_weights, workdir)
        args.corpus = sae_runs.prepare_corpus(recipe, args.corpus, args.model, workdir)
        outputs: dict = {}

        def extra_options(index: int, setting: str, side: str) -> dict:
            options = {"--eval-contexts": args.eval_contexts}
            if (setting, side) not in outputs:  # the first run of each side is evaluated
                suffix = ".ckpt" if side == "neurolight" else ""
                outputs[(setting, side)] = options["--output"] = str(workdir / f"saes_{index}_{setting}_{side}{suffix}")
            return options

        results, fallbacks = sae_runs.run_all(str(Path(__file__).resolve()), args, extra_options)
        for setting in args.settings:  # before the evaluation: a failing evaluation keeps the throughput figures
            summarize(results[setting], args, setting, fallbacks)
        before = sae_runs.load_line()
        try:
            report = quality(args, recipe, outputs)
        except BaseException:
            # The trained SAEs cost the whole run; keep them for a second try at the evaluation.
            kept = shutil.copytree(workdir, tempfile.mkdtemp(prefix="sae_sweep_kept_"), dirs_exist_ok=True)
            print(f"[bench] the evaluation failed; the trained SAEs are kept in {kept}", flush=True)
            raise
        print(f"[bench] quality evaluated, {before} -> {sae_runs.load_line()}")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": results, "fallbacks": fallbacks, "quality": report}))
        print_quality(report, recipe)
        print(
            "\nagg tokens/s: tokens per SAE x SAEs / training wall time (first buffer fill and compilation included, "
            "model loading not; SAELens sequential: the sum of its runs), median over runs. warm: the same from the "
            "median LLM forward and median SAE step. LLM fwd / SAE steps: shares of the training time. "
            "1st fwd,step s: the first LLM forward and SAE step (compilation)."
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
