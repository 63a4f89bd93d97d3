"""Interpretation samples: the running selection equals a brute-force selection over all activations (alone, merged
from halves, and end to end from the tiny model's weights, in one process and under DDP); bad input is refused
with a message that says what is wrong."""

from __future__ import annotations

import math
import socket
import sys

import lightning.pytorch as pl
import pytest
import torch

from neurolight.callbacks.interpret.samples_writer import InterpretationSamplesWriter
from neurolight.datamodules.interpret.corpus_contexts import CorpusContextDataModule
from neurolight.datamodules.interpret.samples import KINDS, InterpretationSamples
from neurolight.lightning_modules.interpret.latent_sampler import LatentSampler, frequency_band, sae_fingerprint
from neurolight.lightning_modules.interpret.running_samples import RunningLatentSamples, random_keys
from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder
from tests.helpers.sae import build_sampler_sae

SIZES = dict(num_top=4, num_quantiles=4, num_per_quantile=2, num_random=3, num_negative=3)
SEED = 7


# ------------------------------------------------------------------------------------------ brute force
def brute_force(acts: torch.Tensor, rows: torch.Tensor, latents, reference_max, seed: int, sizes: dict) -> dict:
    """Per kind, (L, n) corpus rows (-1 empty) and (L, n, T) activations, chosen by sorting Python tuples over
    ALL contexts at once. acts: (N, T, L) with rows (N,)."""
    context_max = acts.amax(1)
    q = sizes["num_quantiles"]
    slots = {kind: sizes[f"num_{kind}"] for kind in ("top", "random", "negative")}
    slots["quantile"] = q * sizes["num_per_quantile"]
    out = {kind: ([], []) for kind in KINDS}
    for j, latent in enumerate(latents.tolist()):
        m = context_max[:, j].tolist()
        index = range(len(rows))
        key = {kind: random_keys(seed, kind, rows, torch.tensor([latent]))[0].tolist() for kind in KINDS[1:]}
        bins = [min(math.floor(m[i] * q / float(reference_max[j])), q - 1) for i in index]
        chosen = {
            "top": sorted((-m[i], int(rows[i]), i) for i in index if m[i] > 0)[: sizes["num_top"]],
            "quantile": [],
            "random": sorted((key["random"][i], int(rows[i]), i) for i in index)[: sizes["num_random"]],
            "negative": sorted((key["negative"][i], int(rows[i]), i) for i in index if m[i] == 0)[
                : sizes["num_negative"]
            ],
        }
        for b in range(q):
            in_bin = sorted((key["quantile"][i], int(rows[i]), i) for i in index if m[i] > 0 and bins[i] == b)
            picked = in_bin[: sizes["num_per_quantile"]]
            chosen["quantile"] += picked + [None] * (sizes["num_per_quantile"] - len(picked))
        for kind, picks in chosen.items():
            picks = picks + [None] * (slots[kind] - len(picks))
            out[kind][0].append([-1 if p is None else p[1] for p in picks])
            zero = torch.zeros(acts.shape[1])
            out[kind][1].append(torch.stack([zero if p is None else acts[p[2], :, j] for p in picks]))
    return {kind: (torch.tensor(r), torch.stack(a)) for kind, (r, a) in out.items()}


def synthetic(num_contexts=60, tokens=5, num_latents=6, seed=0):
    """Sparse activations on a 0.5 grid (so maxima tie); about half the contexts never fire (negatives)."""
    g = torch.Generator().manual_seed(seed)
    acts = (torch.rand(num_contexts, tokens, num_latents, generator=g) * 8).div(0.5).floor().mul(0.5)
    acts = acts * (torch.rand(num_contexts, tokens, num_latents, generator=g) < 0.15)
    rows = torch.randperm(1000, generator=g)[:num_contexts]
    return acts, rows


def feed(acc: RunningLatentSamples, acts, rows, batch_sizes=(7, 1, 12)):
    start, i = 0, 0
    while start < len(rows):
        end = start + batch_sizes[i % len(batch_sizes)]
        acc.update(acts[start:end], rows[start:end])
        start, i = end, i + 1


def make_acc(num_latents=6, tokens=5):
    latents = torch.arange(3, 3 + 2 * num_latents, 2)
    # Powers of two: bin edges m * q / ref are exact in float32 and float64, so both sides bin ties alike.
    reference_max = torch.tensor([8.0, 4.0, 8.0, 2.0, 8.0, 4.0])[:num_latents]
    return RunningLatentSamples(latents, reference_max, tokens, seed=SEED, **SIZES), latents, reference_max


def assert_matches(results: dict, expected: dict) -> None:
    for kind in KINDS:
        rows, acts = expected[kind]
        assert torch.equal(results[f"{kind}_row"], rows), kind
        torch.testing.assert_close(results[f"{kind}_activations"], acts, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ accumulator
def test_running_samples__every_kind_equals_brute_force_over_all_activations():
    acts, rows = synthetic()
    acc, latents, reference_max = make_acc()
    feed(acc, acts, rows)
    results = acc.results()
    assert_matches(results, brute_force(acts, rows, latents, reference_max, SEED, SIZES))
    torch.testing.assert_close(results["max_activation"], acts.amax((0, 1)))


def test_running_samples__selections_obey_their_rules():
    acts, rows = synthetic()
    acc, latents, reference_max = make_acc()
    feed(acc, acts, rows)
    r = acc.results()
    top_max = r["top_activations"].amax(-1)
    assert (top_max[:, :-1] >= top_max[:, 1:]).all() and (top_max > 0).all()  # descending, all firing
    for j in range(len(latents)):
        others = {int(x) for x in rows[acts[:, :, j].amax(1) > top_max[j, -1]]}
        assert others <= set(r["top_row"][j].tolist())  # nothing outside the top beats its last slot
    negative = r["negative_row"] >= 0
    assert negative.sum() > 0 and (r["negative_activations"].amax(-1)[negative] == 0).all()
    quantile_max = r["quantile_activations"].amax(-1).view(len(latents), 4, 2)
    filled = r["quantile_row"].view(len(latents), 4, 2) >= 0
    edges = reference_max[:, None, None] * torch.arange(4)[None, :, None] / 4
    upper = torch.where(torch.arange(4)[None, :, None] == 3, torch.inf, edges + reference_max[:, None, None] / 4)
    assert ((quantile_max >= edges) & (quantile_max < upper) & (quantile_max > 0))[filled].all()
    assert filled.sum() > len(latents)  # more than one bin per latent has contexts
    assert all(len(set(row.tolist())) == 3 for row in r["random_row"])


def test_random_keys__uniform_and_independent_across_latents():
    keys = random_keys(0, "random", torch.arange(20000), torch.tensor([0, 1, 5000]))
    assert keys.min() >= 0 and keys.max() < 1
    assert keys.mean(1).sub(0.5).abs().max() < 0.01 and keys.var(1).sub(1 / 12).abs().max() < 0.005
    assert torch.corrcoef(keys).triu(1).abs().max() < 0.03
    assert not torch.equal(random_keys(1, "random", torch.arange(10), torch.tensor([0])), keys[:1, :10])


def test_running_samples__merge_of_two_halves_equals_one_pass_and_gather_across_ranks():
    acts, rows = synthetic(seed=3)
    whole = make_acc()[0]
    feed(whole, acts, rows)
    halves = [make_acc()[0], make_acc()[0]]
    feed(halves[0], acts[::2], rows[::2], batch_sizes=(5,))
    feed(halves[1], acts[1::2], rows[1::2], batch_sizes=(3, 9))
    merged = make_acc()[0]
    merged.merge(halves[0])
    merged.merge(halves[1].state_dict())
    assert_matches(
        merged.results(), {k: (whole.results()[f"{k}_row"], whole.results()[f"{k}_activations"]) for k in KINDS}
    )

    def fake_all_gather(state: dict) -> dict:  # what rank 0 of two would receive
        return {name: torch.stack([state[name], halves[1].state_dict()[name]]) for name in state}

    halves[0].gather(fake_all_gather, world_size=2)
    for name, value in whole.results().items():
        assert torch.equal(halves[0].results()[name], value), name


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def sae_run(tmp_path_factory, tiny_model_dir):
    """A tiny TopK SAE (128 -> 256, k=8) on layer 1's mlp_activations of the tiny Llama, and its corpus."""
    return build_sampler_sae(tmp_path_factory.mktemp("sampler"), tiny_model_dir)


def brute_force_latents(model_dir, checkpoint, input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, T, d_sae) latents from the weights: the down_proj input of layer 1, times the checkpoint's scale,
    through (x - b_dec) W_enc^T + b_enc and a per-token top-8; position 0 zeroed (exclude_first_position)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    captured = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            for start in range(0, len(input_ids), batch_size):
                model(input_ids=input_ids[start : start + batch_size])
    finally:
        handle.remove()
    x = torch.cat(captured) * state["activation_scale"]
    pre = (x - state["sae.b_dec"]) @ state["sae.W_enc"].T + state["sae.b_enc"]
    values, indices = pre.topk(8, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    latents[:, 0] = 0
    return latents


def run_sampler(checkpoint, corpus, save_path, devices=1, **overrides):
    kwargs = dict(log_freq_lower=-2.0, log_freq_upper=-1.3, seed=SEED, **SIZES)
    module = LatentSampler(str(checkpoint), **{**kwargs, **overrides})
    datamodule = CorpusContextDataModule(str(corpus), frequency_tokens=48 * 16, num_samples=80, batch_size=16)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        callbacks=[InterpretationSamplesWriter(str(save_path))],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    datamodule.setup("predict")
    return datamodule


@pytest.mark.usefixtures("one_torch_thread")
def test_latent_sampler__written_samples_match_brute_force_from_the_weights(sae_run, tiny_model_dir, tmp_path):
    _, corpus, checkpoint = sae_run
    datamodule = run_sampler(checkpoint, corpus, tmp_path / "samples")
    samples = InterpretationSamples(tmp_path / "samples")

    freq_rows = datamodule.frequency_rows()
    freq_latents = brute_force_latents(tiny_model_dir, checkpoint, datamodule.contexts(freq_rows), 16)
    frequency = (freq_latents[:, 1:] > 0).sum((0, 1)).double() / (len(freq_rows) * 15)
    torch.testing.assert_close(samples.frequency, frequency)
    log_f = frequency.log10()
    kept = ((log_f > -2) & (log_f < -1.3)).nonzero().flatten()
    assert torch.equal(samples.latents, kept)
    meta = samples.metadata
    assert meta["below_band"] == int((log_f <= -2).sum()) > 0 and meta["above_band"] == int((log_f >= -1.3).sum()) > 0
    assert meta["d_in"] == 128 and meta["d_sae"] == 256 and meta["frequency_tokens"] == len(freq_rows) * 15
    assert meta["activation_scale"] == pytest.approx(float(torch.load(checkpoint)["state_dict"]["activation_scale"]))
    sae = SparseAutoencoder.from_pretrained(checkpoint)
    assert meta["sae_fingerprint"] == sae_fingerprint(sae)
    with torch.no_grad():
        sae.W_enc[0, 0] += 1e-3
    assert sae_fingerprint(sae) != meta["sae_fingerprint"]

    rows = datamodule.sample_rows()
    latents = brute_force_latents(tiny_model_dir, checkpoint, datamodule.contexts(rows), 16)[..., kept]
    reference = freq_latents[..., kept].amax((0, 1))
    expected = brute_force(latents, rows, kept, reference, SEED, SIZES)
    torch.testing.assert_close(samples.max_activation, latents.amax((0, 1)))
    for j, latent in enumerate(kept.tolist()):
        for kind in KINDS:
            records = samples.records(latent, kind)
            want = [(int(r), i) for i, r in enumerate(expected[kind][0][j].tolist()) if r >= 0]
            assert [rec.context_index for rec in records] == [r for r, _ in want], (latent, kind)
            for rec, (row, slot) in zip(records, want, strict=True):
                assert torch.equal(rec.token_ids, datamodule.contexts(torch.tensor([row]))[0])
                torch.testing.assert_close(rec.activations, expected[kind][1][j, slot], atol=1e-5, rtol=1e-5)
    for kind in KINDS:  # every kind has records to compare, not only empty slots
        assert sum(len(samples.records(latent, kind)) for latent in kept.tolist()) > len(kept) // 2, kind


# DDP: two spawned processes import torch, Lightning and transformers: ~25 s on 2 shared cores
def test_latent_sampler__ddp_two_ranks_write_what_one_process_writes(sae_run, tmp_path, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    _, corpus, checkpoint = sae_run
    run_sampler(checkpoint, corpus, tmp_path / "one")
    run_sampler(checkpoint, corpus, tmp_path / "two", devices=2)
    one, two = InterpretationSamples(tmp_path / "one"), InterpretationSamples(tmp_path / "two")
    assert one.tensors.keys() == two.tensors.keys()
    for name, value in one.tensors.items():
        if value.is_floating_point():
            torch.testing.assert_close(two.tensors[name], value, atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert torch.equal(two.tensors[name], value), name


def test_corpus_contexts__ddp_ranks_read_disjoint_contexts_and_every_one_once(sae_run):
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper

    datamodule = CorpusContextDataModule(str(sae_run[1]), frequency_tokens=40 * 16, num_samples=37, batch_size=4)
    datamodule.setup("predict")
    for loader, rows in zip(datamodule.predict_dataloader(), (datamodule.frequency_rows(), datamodule.sample_rows())):
        seen = []
        for rank in range(3):
            sampler = UnrepeatedDistributedSamplerWrapper(loader.sampler, num_replicas=3, rank=rank, shuffle=False)
            seen.append([int(loader.dataset[i][0]) for i in sampler])
        assert all(set(a).isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])
        assert sorted(row for rank_rows in seen for row in rank_rows) == sorted(rows.tolist())
    rows, ids = next(iter(datamodule.predict_dataloader()[1]))
    assert torch.equal(ids, datamodule.contexts(rows)) and ids.shape == (4, 16)


# ------------------------------------------------------------------------------------------ bad input
def test_frequency_band__keeps_the_open_interval_and_counts_both_sides():
    fired = torch.tensor([0, 0, 1, 10, 100, 1000, 5000, 10])  # over 10_000 tokens: log10 f = -inf,-inf,-4,-3,-2,-1,..
    band = frequency_band(fired, 10_000, -4.0, -1.0)
    assert band["latents"].tolist() == [3, 4, 7]
    assert (band["below"], band["above"], band["never_fired"]) == (3, 2, 2)
    with pytest.raises(
        ValueError,
        match=r"-2.5 < log10 f < -2.1 over 10000 tokens: 5 at or below -2.5 \(2 of them "
        r"never fired\), 3 at or above -2.1; widen the band",
    ):
        frequency_band(fired, 10_000, -2.5, -2.1)


def test_latent_sampler__empty_band_fails_with_counts_on_each_side(sae_run, tmp_path):
    _, corpus, checkpoint = sae_run
    with pytest.raises(ValueError, match=r"no latent has -0.1 < log10 f < -0.05 over 720 tokens: \d+ at or below"):
        run_sampler(checkpoint, corpus, tmp_path / "none", log_freq_lower=-0.1, log_freq_upper=-0.05)


def test_latent_sampler__lower_bound_at_or_above_upper_is_refused(sae_run):
    with pytest.raises(ValueError, match=r"log_freq_lower=-1.0 must be below log_freq_upper=-1.0"):
        LatentSampler(str(sae_run[2]), log_freq_lower=-1.0, log_freq_upper=-1.0)


def test_latent_sampler__checkpoint_that_is_not_an_sae_says_what_it_is(tmp_path):
    other = tmp_path / "send.ckpt"
    hparams = {"_class_path": "neurolight.lightning_modules.SendModule", "model_name": "x"}
    torch.save({"state_dict": {"model.lm_head.weight": torch.zeros(2)}, "hyper_parameters": hparams}, other)
    with pytest.raises(
        ValueError, match=r"is a checkpoint of neurolight.lightning_modules.SendModule, not a sparse autoencoder"
    ):
        LatentSampler(str(other))
    plain = tmp_path / "50000.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match=r"is a plain state dict or dict \(keys encoder.weight, \.\.\.\)"):
        LatentSampler(str(plain))
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"is not a loadable PyTorch checkpoint"):
        LatentSampler(str(text))
    with pytest.raises(FileNotFoundError, match=r"does not exist; a neurolight checkpoint is a .ckpt file"):
        LatentSampler(str(tmp_path / "missing.ckpt"))


def test_corpus_contexts__too_few_contexts_says_how_many(sae_run):
    with pytest.raises(ValueError, match=r"has 128 contexts of 16 tokens; num_samples=500 is more"):
        CorpusContextDataModule(str(sae_run[1]), frequency_tokens=16, num_samples=500).setup("predict")
    with pytest.raises(ValueError, match=r"frequency_tokens=4096 needs 256: lower frequency_tokens to at most 2048"):
        CorpusContextDataModule(str(sae_run[1]), frequency_tokens=4096, num_samples=5).setup("predict")


def test_samples_writer__refuses_a_non_empty_save_path_without_overwrite(sae_run, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metadata.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"exists and is not empty; choose another save_path or set overwrite"):
        run_sampler(sae_run[2], sae_run[1], tmp_path / "old")


def test_cli__predict_with_the_demo_recipe_writes_samples(sae_run, tmp_path, monkeypatch):
    from neurolight.cli.main import run

    monkeypatch.setattr(sys, "argv", ["neurolight"])
    _, corpus, checkpoint = sae_run
    args = ["predict", "--config", "configs/interpret/sample.yaml", "--trainer.accelerator", "cpu"]
    args += ["--trainer.enable_progress_bar", "false", "--model.init_args.sae_checkpoint", str(checkpoint)]
    args += ["--model.init_args.log_freq_lower", "-3", "--model.init_args.log_freq_upper", "-0.5"]
    args += ["--data.init_args.dataset_path", str(corpus), "--data.init_args.frequency_tokens", "256"]
    args += ["--data.init_args.num_samples", "32", "--trainer.callbacks.init_args.save_path", str(tmp_path / "s")]
    run(args)
    samples = InterpretationSamples(tmp_path / "s")
    assert samples.metadata["num_samples"] == 32 and len(samples) > 0
