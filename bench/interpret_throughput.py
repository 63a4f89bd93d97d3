"""Interpretation throughput on the demo configuration: logit-based simulation against generate-and-parse.

    .venv/bin/python bench/interpret_throughput.py [--latents 8] [--threads 1] [--device cpu|cuda] [--dtype bfloat16]
        [--json FILE]

Both simulators run in the same process on the same explainer (``configs/interpret/demo.yaml``: SmolLM2-135M-
Instruct, its dtype, forward batch size, sample counts and latents per predict step), for the same latents, the
same explanations and the same held-out records. Latents go in the config's batches, as ``LatentInterpreter.
predict_step`` takes them; per batch the order of the two simulators alternates, so that load from other processes
hits both alike. Timed per batch: the explanations (shared), the simulation scorer with each simulator, and the
config's other scorers (shared: detection, fuzzing). Printed: latents per hour of the whole explain + simulate (+
other scorers) pipeline with each simulator, the simulation alone, their ratios, and the mean score of each
simulator (the logit one should not score worse).

Samples: ``runs/demo/interpret/samples`` when it exists (``neurolight predict --config
configs/interpret/sample.yaml``); otherwise they are built in a temporary directory by brute force from the demo
corpus and SAE checkpoint (``--contexts`` contexts through SmolLM2 up to layer 15, the checkpoint's normalisation
and encoder, position 0 left out as in training). ``--samples DIR`` points elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neurolight.datamodules.interpret.samples import save_interpretation_samples  # noqa: E402
from neurolight.datamodules.interpret.tasks import InterpretationDataModule  # noqa: E402
from neurolight.lightning_modules.interpret.interpreter import LatentInterpreter  # noqa: E402
from neurolight.lightning_modules.interpret.scorers import SimulationScorer  # noqa: E402

CONFIG = ROOT / "configs" / "interpret" / "demo.yaml"
DEMO_SAMPLES = ROOT / "runs" / "demo" / "interpret" / "samples"
DEMO_CORPUS = ROOT / "runs" / "demo" / "corpus"
DEMO_SAE = ROOT / "runs" / "demo" / "sae" / "smollm2-135m_l15_mlp_sublayer" / "version_0" / "checkpoints" / "last.ckpt"


def build_samples(target: Path, contexts: int, latents: int, device: str, seed: int = 0) -> Path:
    """Brute-force samples of the demo SAE: every activation of ``contexts`` corpus contexts is computed, then per
    latent in the frequency band 1e-4..1e-1 the top 12 contexts by max activation, 6 across the activation
    quantiles of the contexts where it fires, 8 random ones and 8 where it never fires."""
    from neurolight.datamodules.llm.hooked import HookedLLM
    from neurolight.datamodules.llm.models import load_causal_lm
    from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus
    from neurolight.lightning_modules.sae.checkpoint_args import init_args_from_checkpoint
    from neurolight.lightning_modules.sae.module import SparseAutoencoderModule

    checkpoint = torch.load(DEMO_SAE, map_location="cpu", weights_only=False)
    sae_args = init_args_from_checkpoint(checkpoint["hyper_parameters"])
    data_args = checkpoint["datamodule_hyper_parameters"]
    sae = SparseAutoencoderModule(**sae_args)
    sae.load_state_dict(checkpoint["state_dict"])
    sae = sae.eval().to(device)
    llm = HookedLLM(
        load_causal_lm(data_args["model_name"], device=device), data_args["layer_type"], data_args["layer_id"]
    )
    corpus = TokenizedCorpus(DEMO_CORPUS)
    rng = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(corpus), generator=rng)[:contexts].sort().values
    ids = corpus.batch(rows.numpy())
    acts = []
    with torch.no_grad():
        for batch in ids.split(16):
            x = sae.normalize(llm.harvest(batch.to(device)))
            acts.append(sae.sae.encode(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1).cpu())
    acts = torch.cat(acts)  # (N, T, d_sae)
    acts[:, 0] = 0  # the BOS / attention-sink position, left out in training too
    frequency = (acts[:, 1:] > 0).double().mean((0, 1))
    context_max = acts.amax(1)  # (N, d_sae)
    band = ((frequency > 1e-4) & (frequency < 1e-1) & ((context_max > 0).sum(0) >= 24)).nonzero()[:, 0]
    chosen = band[torch.randperm(len(band), generator=rng)[:latents]].sort().values
    slots = {"top": 12, "quantile": 6, "random": 8, "negative": 8}
    tensors = {"latents": chosen, "frequency": frequency, "contexts": ids, "context_index": rows}
    for kind, n in slots.items():
        tensors[f"{kind}_context"] = torch.full((len(chosen), n), -1, dtype=torch.long)
        tensors[f"{kind}_activations"] = torch.zeros(len(chosen), n, ids.shape[1])
    for i, latent in enumerate(chosen.tolist()):
        maxima = context_max[:, latent]
        firing = maxima.argsort(descending=True)[: int((maxima > 0).sum())]
        quantiles = firing.flip(0)[torch.linspace(0, len(firing) - 1, slots["quantile"]).long()]
        silent = (maxima == 0).nonzero()[:, 0]
        picks = {
            "top": firing[: slots["top"]],
            "quantile": quantiles,
            "random": torch.randperm(len(rows), generator=rng)[: slots["random"]],
            "negative": silent[torch.randperm(len(silent), generator=rng)[: slots["negative"]]],
        }
        for kind, picked in picks.items():
            tensors[f"{kind}_context"][i, : len(picked)] = picked
            tensors[f"{kind}_activations"][i, : len(picked)] = acts[picked, :, latent]
    tensors["max_activation"] = context_max[:, chosen].amax(0)
    metadata = {
        "sae_checkpoint": str(DEMO_SAE),
        "model_name": data_args["model_name"],
        "layer_id": data_args["layer_id"],
        "layer_type": data_args["layer_type"],
        "d_in": sae_args["act_vec_size"],
        "d_sae": sae_args["dict_vec_size"],
        "num_tokens": ids.shape[1],
        "num_samples": contexts,
        "frequency_tokens": contexts * (ids.shape[1] - 1),
        "exclude_first_position": True,  # position 0 zeroed above, never measured
        "built_by": "bench/interpret_throughput.py (brute force)",
    }
    return save_interpretation_samples(target, tensors, metadata)


def timed(device: str, fn, *args):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    model_args, data_args = config["model"]["init_args"], config["data"]["init_args"]
    samples = Path(args.samples) if args.samples else DEMO_SAMPLES
    if not (samples / "metadata.json").is_file():
        if args.samples:
            raise FileNotFoundError(f"--samples {samples} holds no interpretation samples")
        samples = Path(tempfile.mkdtemp(prefix="interpret-bench-")) / "samples"
        print(f"{DEMO_SAMPLES} is missing: building samples from {args.contexts} demo contexts into {samples}")
        _, seconds = timed(args.device, build_samples, samples, args.contexts, args.latents, args.device)
        print(f"  built in {seconds:.0f} s")
    data = InterpretationDataModule(**{**data_args, "samples_path": str(samples), "max_latents": args.latents})
    data.setup("predict")
    if args.dtype:
        model_args = {**model_args, "explainer_dtype": args.dtype}
    interpreter = LatentInterpreter(**model_args).to(args.device)
    interpreter.configure_model()
    interpreter.model.to(args.device)
    simulation = SimulationScorer()
    others = [scorer for scorer in interpreter.scorers if scorer.name != simulation.name]
    rows = []
    latents = data.pending_latents()
    size = data.hparams.batch_size  # latents per predict step, as the demo runs them (explanations batched)
    with torch.inference_mode():
        for i, first in enumerate(range(0, len(latents), size)):
            tasks = [data.task(latent) for latent in latents[first : first + size]]
            explanations, t_explain = timed(args.device, interpreter.explain, tasks)
            sides = ("logits", "generate") if i % 2 == 0 else ("generate", "logits")
            seconds, scores = {}, {}
            for side in sides:
                interpreter.hparams.simulator = side
                results, seconds[side] = timed(args.device, interpreter.score, simulation, tasks, explanations)
                scores[side] = [result["score"] for result in results]
            t_others = sum(timed(args.device, interpreter.score, scorer, tasks, explanations)[1] for scorer in others)
            row = {"latents": [t.latent for t in tasks], "explanations": explanations}
            row |= {"explain_s": t_explain, "other_scorers_s": t_others}
            row |= {f"{side}_s": seconds[side] for side in sides} | {f"{side}_scores": scores[side] for side in sides}
            rows.append(row)
            for k, task in enumerate(tasks):
                print(
                    f"latent {task.latent:5d}  scores {scores['logits'][k]:+.2f} / {scores['generate'][k]:+.2f}  "
                    f"{explanations[k][:60]!r}"
                )
            print(
                f"  {len(tasks)} latents: explain {t_explain:5.1f} s  logits {seconds['logits']:5.1f} s  "
                f"generate {seconds['generate']:6.1f} s  {', '.join(s.name for s in others) or 'no other scorer'} "
                f"{t_others:4.1f} s",
                flush=True,
            )
    return summarize(rows, samples, [scorer.name for scorer in others])


def summarize(rows: list[dict], samples: Path, others: list[str]) -> dict:
    total = {key: sum(r[key] for r in rows) for key in ("explain_s", "other_scorers_s", "logits_s", "generate_s")}
    shared = total["explain_s"] + total["other_scorers_s"]
    n = sum(len(r["latents"]) for r in rows)
    rate = {side: 3600 * n / (shared + total[f"{side}_s"]) for side in ("logits", "generate")}
    sim_rate = {side: 3600 * n / total[f"{side}_s"] for side in ("logits", "generate")}

    def mean_score(side: str) -> float:
        values = [x for r in rows for x in r[f"{side}_scores"] if not math.isnan(x)]
        return statistics.fmean(values) if values else math.nan

    summary = {
        "latents": n,
        "samples": str(samples),
        "other_scorers": others,
        "seconds": total,
        "latents_per_hour": rate,
        "ratio": rate["logits"] / rate["generate"],
        "simulation_latents_per_hour": sim_rate,
        "simulation_ratio": sim_rate["logits"] / sim_rate["generate"],
        "mean_score": {side: mean_score(side) for side in ("logits", "generate")},
        "rows": rows,
    }
    print(
        f"\n{n} latents; explain {total['explain_s']:.0f} s, {', '.join(others) or 'no other scorer'} "
        f"{total['other_scorers_s']:.0f} s (shared)"
    )
    print(
        f"pipeline latents/hour: logits {rate['logits']:.0f}, generate {rate['generate']:.0f}, "
        f"ratio {summary['ratio']:.1f}x"
    )
    print(
        f"simulation only latents/hour: logits {sim_rate['logits']:.0f}, generate {sim_rate['generate']:.0f}, "
        f"ratio {summary['simulation_ratio']:.1f}x"
    )
    print(
        f"mean score: logits {summary['mean_score']['logits']:+.3f}, generate {summary['mean_score']['generate']:+.3f}"
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--latents", type=int, default=8, help="latents timed (the first of the samples), in the config's batches"
    )
    parser.add_argument("--samples", help="samples directory (default: runs/demo/interpret/samples, else built)")
    parser.add_argument("--contexts", type=int, default=384, help="contexts scanned when building samples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="explainer weights for both simulators (default: the config's)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (1 gives stable figures on a shared CPU)")
    parser.add_argument("--json", help="write the figures and per-latent rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
