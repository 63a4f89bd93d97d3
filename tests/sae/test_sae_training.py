import copy
import csv
import math

import lightning.pytorch as pl
import pytest
import torch

from neurolight.callbacks import DeadLatentResampler
from neurolight.lightning_modules import SparseAutoencoderModule
from neurolight.lightning_modules.sae.metrics import explained_variance
from neurolight.lightning_modules.sae.optim import adam
from tests.helpers.sae import build_tiny_corpus, make_datamodule, make_module, make_trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    return build_tiny_corpus(tmp_path_factory.mktemp("sae-corpus"), tiny_model_dir)


def held_out_activations(datamodule, module):
    ids = datamodule.corpus.batch(range(datamodule.num_train_contexts, len(datamodule.corpus)))[:, :16]
    acts = datamodule.hooked_llm.harvest(ids)[:, 1:]
    return module.normalize(acts.reshape(-1, acts.shape[-1]))


def test_fit__learns_and_writes_checkpoints_with_histograms(tmp_path, corpus, tiny_model_dir):
    datamodule, module = make_datamodule(corpus, tiny_model_dir), make_module()
    trainer = make_trainer(tmp_path, max_steps=60, ckpt_every=30, limit_val_batches=1, val_check_interval=30)
    trainer.fit(module, datamodule)
    x = held_out_activations(datamodule, module)
    with torch.no_grad():
        assert explained_variance(x, module.sae(x).x_hat) > 0.5
    for name in ("step_0000030", "step_0000060", "last"):
        assert (tmp_path / "checkpoints" / f"{name}.ckpt").is_file()
        assert (tmp_path / "checkpoints" / f"{name}_feature_density.png").stat().st_size > 1000
    assert {"val/ce_loss_recovered", "val/kl", "train/l0", "train/explained_variance"} <= set(trainer.callback_metrics)
    # Unit-norm decoder through training (gradient projection + renormalisation).
    torch.testing.assert_close(module.sae.W_dec.norm(dim=1), torch.ones(256))


def test_normalization__estimated_once_so_mean_norm_is_sqrt_d_and_round_trips(tmp_path, corpus, tiny_model_dir):
    datamodule, module = make_datamodule(corpus, tiny_model_dir), make_module()
    make_trainer(tmp_path, max_steps=3, ckpt_every=3).fit(module, datamodule)
    # Independent estimate: the first buffer of a fresh datamodule with the same seed holds the same rows.
    fresh = make_datamodule(corpus, tiny_model_dir)
    fresh.setup("fit")
    expected = math.sqrt(128) / fresh.buffer.peek().norm(dim=1).mean().item()
    assert module.activation_scale.item() == pytest.approx(expected, rel=1e-5)
    assert module.normalize(fresh.buffer.peek()).norm(dim=1).mean().item() == pytest.approx(math.sqrt(128), rel=1e-4)
    restored = SparseAutoencoderModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert restored.activation_scale.item() == module.activation_scale.item()
    x = torch.randn(4, 128)
    torch.testing.assert_close(restored.reconstruct(x), module.reconstruct(x))


def test_resume__continues_exactly_like_an_uninterrupted_run(tmp_path, corpus, tiny_model_dir):
    torch.manual_seed(0)
    straight = make_module()
    torch.manual_seed(0)
    interrupted = make_module()
    make_trainer(tmp_path / "a", max_steps=24, ckpt_every=12, resample_every=8).fit(
        straight, make_datamodule(corpus, tiny_model_dir)
    )
    make_trainer(tmp_path / "b", max_steps=12, ckpt_every=12, resample_every=8).fit(
        interrupted, make_datamodule(corpus, tiny_model_dir)
    )
    resumed_module = make_module()
    trainer = make_trainer(tmp_path / "b", max_steps=24, ckpt_every=12, resample_every=8)
    trainer.fit(resumed_module, make_datamodule(corpus, tiny_model_dir), ckpt_path=tmp_path / "b/checkpoints/last.ckpt")
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed_module.state_dict()[name], value, msg=name)
    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=False)
    for key in a["callbacks"]:
        for field, value in a["callbacks"][key].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(b["callbacks"][key][field], value, msg=f"{key}.{field}")
    assert a["ActivationDataModule"]["ranks"][0]["position"] == b["ActivationDataModule"]["ranks"][0]["position"]


def test_resume_from_the_final_step_checkpoint__writes_last_ckpt_after_the_final_validation(
    tmp_path, corpus, tiny_model_dir
):
    trainer = make_trainer(tmp_path, max_steps=8, ckpt_every=4, limit_val_batches=1, val_check_interval=8)
    trainer.fit(make_module(), make_datamodule(corpus, tiny_model_dir))
    folder = tmp_path / "checkpoints"
    final = torch.load(folder / "step_0000008.ckpt", weights_only=False)
    last = torch.load(folder / "last.ckpt", weights_only=False)
    # Written after the step's validation: resuming from it runs nothing that an uninterrupted run did not.
    assert (
        final["loops"]["fit_loop"]["epoch_loop.val_loop.state_dict"]
        == last["loops"]["fit_loop"]["epoch_loop.val_loop.state_dict"]
    )
    assert final["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"] == 1
    # Killed between the two files: the resume meets a finished loop, and still leaves last.ckpt.
    (folder / "last.ckpt").unlink()
    resumed = make_module()
    make_trainer(tmp_path, max_steps=8, ckpt_every=4).fit(
        resumed, make_datamodule(corpus, tiny_model_dir), ckpt_path=folder / "step_0000008.ckpt"
    )
    again = torch.load(folder / "last.ckpt", weights_only=False)
    assert again["global_step"] == 8
    for name, value in last["state_dict"].items():
        assert torch.equal(again["state_dict"][name], value), name


class KillLatents(pl.Callback):
    """Silences latents after step 2 (when they already have Adam moments); records those moments at step 10."""

    def __init__(self, latents):
        self.latents, self.moments_before = latents, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            with torch.no_grad():
                pl_module.sae.b_enc[self.latents] = -1e4
        if trainer.global_step == 10:
            state = trainer.optimizers[0].state[pl_module.sae.W_enc]
            self.moments_before = state["exp_avg_sq"][self.latents].abs().sum().item()


def test_resampler__revives_dead_latents_and_resets_adam(tmp_path, corpus, tiny_model_dir):
    module = make_module()
    killed = torch.arange(0, 256, 4)
    killer = KillLatents(killed)
    # Resampling at steps 5 and 10: the killed latents fired before step 2, so only the second window finds them.
    resampler = DeadLatentResampler(method="anthropic", neuron_resampling_interval=5)
    trainer = make_trainer(tmp_path, max_steps=10)
    trainer.callbacks.extend([killer, resampler])  # the killer records the moments before the resampler runs
    datamodule = make_datamodule(corpus, tiny_model_dir)
    trainer.fit(module, datamodule)
    assert resampler.history[-1]["step"] == 10 and resampler.history[-1]["dead"] >= len(killed)
    assert killer.moments_before > 0
    assert torch.all(module.sae.b_enc[killed] == 0)
    torch.testing.assert_close(module.sae.W_dec[killed].norm(dim=1), torch.ones(len(killed)))
    state = trainer.optimizers[0].state
    for param in (module.sae.W_enc, module.sae.W_dec, module.sae.b_enc):
        assert torch.all(state[param]["exp_avg"][killed] == 0) and torch.all(state[param]["exp_avg_sq"][killed] == 0)
    assert state[module.sae.W_enc]["exp_avg"].abs().sum() > 0  # the live rows keep their moments
    x = held_out_activations(datamodule, module)
    with torch.no_grad():
        revived = (module.sae(x).latents[:, killed] > 0).any(0)
    assert revived.float().mean() > 0.9


def test_d_in_mismatch__names_both_sizes(tmp_path, corpus, tiny_model_dir):
    with pytest.raises(ValueError, match=r"d_in=128.*act_vec_size=64"):
        make_trainer(tmp_path, max_steps=1).fit(make_module(act_vec_size=64), make_datamodule(corpus, tiny_model_dir))


def test_resampler__unknown_method_lists_choices():
    with pytest.raises(ValueError, match="replacement, anthropic"):
        DeadLatentResampler(method="ghost")


def test_replacement_resampling__revives_dead_latents(tmp_path, corpus, tiny_model_dir):
    module = make_module()
    killed = torch.arange(1, 256, 8)
    with torch.no_grad():
        module.sae.b_enc[killed] = -1e4
    resampler = DeadLatentResampler(method="replacement", neuron_resampling_interval=6)
    trainer = make_trainer(tmp_path, max_steps=6)
    trainer.callbacks.append(resampler)
    datamodule = make_datamodule(corpus, tiny_model_dir)
    trainer.fit(module, datamodule)
    assert resampler.history == [{"step": 6, "dead": resampler.history[0]["dead"]}]
    assert resampler.history[0]["dead"] >= len(killed)
    live = torch.ones(256, dtype=torch.bool)
    live[killed] = False
    # New encoder rows at the mean norm of the live ones (replacement recipe), unit decoder rows.
    enc_norms = module.sae.W_enc.detach().norm(dim=1)
    assert enc_norms[killed].std() < 1e-4
    torch.testing.assert_close(module.sae.W_dec[killed].norm(dim=1), torch.ones(len(killed)))
    assert torch.all(module.sae.b_enc[killed] == 0)


def test_wandb_logger__offline_run_records_metrics(tmp_path, corpus, tiny_model_dir, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="neurolight-test")
    module = make_module(metrics_every_n_steps=5)
    make_trainer(tmp_path, max_steps=10, logger=logger).fit(module, make_datamodule(corpus, tiny_model_dir))
    summary = logger.experiment.summary
    assert 0 < summary["train/l0"] <= 256 and "train/explained_variance" in summary.keys()
    logger.experiment.finish()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_step_losses__logged_every_log_every_n_steps_as_lightning_writes_them(tmp_path, corpus, tiny_model_dir):
    import csv

    module = make_module(metrics_every_n_steps=5)
    trainer = make_trainer(tmp_path, max_steps=10, log_every_n_steps=5)
    trainer.fit(module, make_datamodule(corpus, tiny_model_dir))
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    loss_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    l0_steps = [int(r["step"]) for r in rows if r.get("train/l0")]
    # Lightning writes step values after the 5th and 10th batches (global steps 4 and 9), as before.
    assert loss_steps == l0_steps == [4, 9]
    assert all(float(r["train/loss"]) > 0 for r in rows if r.get("train/loss"))


# ------------------------------------------------------------------------------------------------- bfloat16
def test_bf16_llm__buffer_holds_the_bf16_models_activations_in_bfloat16(corpus, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tests.llm.test_hooked_llm import manual_layer

    # configs/sae/codellama-7b-l19.yaml: the LLM and the buffer in bfloat16.
    datamodule = make_datamodule(corpus, tiny_model_dir, llm_dtype="bfloat16", buffer_dtype="bfloat16")
    datamodule.setup("fit")
    hooked = datamodule.hooked_llm
    assert hooked.model.dtype == torch.bfloat16 and hooked.truncated  # the fast path passed its check in bf16
    storage = datamodule.buffer.peek()
    assert storage.dtype == torch.bfloat16 and storage.shape == (6 * 64, 128)

    # The first fill writes the rows of the first LLM batches in order: contexts in the order of the first pass
    # (the datamodule's seed 0), 16 tokens each, position 0 excluded.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    order = torch.randperm(datamodule.num_train_contexts, generator=torch.Generator().manual_seed(0))
    ids = datamodule.corpus.batch(order[:32].numpy())[:, :16]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1]
        expected = manual_layer(model, 1, hidden)["mlp_activations"][:, 1:].reshape(-1, 128)[: len(storage)]
    assert expected.dtype == torch.bfloat16
    # Both sides round every product to bfloat16 (eps 2^-7), in different places: within two epsilons.
    error, expected = storage.float() - expected.float(), expected.float()
    assert error.norm() < 2**-6 * expected.norm() and error.abs().max() < 2**-6 * expected.abs().max()


@pytest.mark.parametrize(("precision", "autocast"), [("32-true", None), ("bf16-mixed", torch.bfloat16)])
def test_bf16_buffer__sae_trains_in_float32_weights_with_a_unit_norm_decoder(
    tmp_path, corpus, tiny_model_dir, precision, autocast
):
    # 32-true: the codellama recipe (bf16 LLM and buffer, fp32 SAE); bf16-mixed: with configs/trainer/deepspeed.yaml.
    datamodule = make_datamodule(corpus, tiny_model_dir, llm_dtype="bfloat16", buffer_dtype="bfloat16")
    torch.manual_seed(0)
    module = make_module()
    initial = copy.deepcopy(module.sae)
    batch_dtypes, forward_autocast = set(), set()

    def record_autocast(sae, args):
        forward_autocast.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    module.sae.register_forward_pre_hook(record_autocast)
    record = pl.callbacks.LambdaCallback(on_train_batch_start=lambda t, m, batch, i: batch_dtypes.add(batch.dtype))
    trainer = make_trainer(tmp_path, max_steps=60, precision=precision)
    trainer.callbacks.append(record)
    trainer.fit(module, datamodule)
    x = held_out_activations(datamodule, module)

    def explained(sae):  # by hand
        with torch.no_grad():
            x_hat = sae(x).x_hat.float()
        return 1 - float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert batch_dtypes == {torch.bfloat16}  # served from the bfloat16 buffer
    assert forward_autocast == {autocast}  # the training forward's matrix products: bf16 under bf16-mixed
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert explained(initial) < 0 and explained(module.sae) > 0.5
    torch.testing.assert_close(module.sae.W_dec.norm(dim=1), torch.ones(256))


def test_bf16_mixed__losses_and_metrics_stay_within_tolerance_of_float32(tmp_path, corpus, tiny_model_dir):
    """The SAE step under bf16-mixed (bf16 matrix products, AMX / AVX512-BF16 on CPU) against the same run in
    float32: same seed, same activations (float32 buffer), the logged losses and metrics compared step by step."""
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        module = make_module(metrics_every_n_steps=10)
        trainer = make_trainer(tmp_path / precision, max_steps=40, precision=precision, log_every_n_steps=10)
        trainer.fit(module, make_datamodule(corpus, tiny_model_dir))
        with (tmp_path / precision / "logs" / "version_0" / "metrics.csv").open(newline="") as file:
            runs[precision] = (module, list(csv.DictReader(file)))
    (_, rows32), (bf16, rows16) = runs["32-true"], runs["bf16-mixed"]
    assert len(rows32) == len(rows16) > 0
    for ours, theirs in zip(rows16, rows32, strict=True):
        for name in ("train/loss", "train/mse", "train/explained_variance", "train/l0"):
            if theirs.get(name):
                # bf16 keeps 8 bits of mantissa in the products: about 1% on sums over 128 dimensions.
                assert float(ours[name]) == pytest.approx(float(theirs[name]), rel=0.05, abs=0.02), (
                    name,
                    theirs["step"],
                )
    torch.testing.assert_close(bf16.sae.W_dec.norm(dim=1), torch.ones(256))
    assert {p.dtype for p in bf16.parameters()} == {torch.float32}


@pytest.mark.parametrize("step", [8, 12], ids=["at_a_resampling", "between_resamplings"])
def test_resume_from_a_step_checkpoint__is_bit_identical_to_an_uninterrupted_run(
    tmp_path, corpus, tiny_model_dir, step
):
    torch.manual_seed(0)
    straight = make_module()
    make_trainer(tmp_path / "a", max_steps=20, ckpt_every=4, resample_every=8).fit(
        straight, make_datamodule(corpus, tiny_model_dir)
    )
    checkpoint = tmp_path / "a" / "checkpoints" / f"step_{step:07d}.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]["sae.W_dec"]
    assert torch.allclose(saved.norm(dim=1), torch.ones(len(saved)), atol=1e-6)  # saved after the renormalisation
    resumed = make_module()
    make_trainer(tmp_path / "b", max_steps=20, ckpt_every=4, resample_every=8).fit(
        resumed, make_datamodule(corpus, tiny_model_dir), ckpt_path=checkpoint
    )
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=False)
    for group_a, group_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(group_a[key], group_b[key]), key
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_explained_variance_metric__is_the_whole_sets_not_a_mean_of_batch_ratios():
    from neurolight.lightning_modules.sae.metrics import ExplainedVariance

    generator = torch.Generator().manual_seed(0)
    # Two batches of different sizes and means: the mean of their ratios differs from the ratio over the set.
    batches = [torch.randn(7, 5, generator=generator) + 3, torch.randn(40, 5, generator=generator) * 2]
    reconstructions = [x + 0.5 * torch.randn(x.shape, generator=generator) for x in batches]
    metric = ExplainedVariance()
    for x, x_hat in zip(batches, reconstructions):
        metric.update(x, x_hat)
    x, x_hat = torch.cat(batches), torch.cat(reconstructions)
    assert torch.allclose(metric.compute(), explained_variance(x, x_hat), atol=1e-6)
    mean_of_ratios = sum(explained_variance(a, b) for a, b in zip(batches, reconstructions)) / 2
    assert abs(float(mean_of_ratios - metric.compute())) > 0.01


def test_adam__fused_on_cpu_with_the_update_of_torchs_loop_adam():
    """``module.adam`` takes parameters or groups; on CPU it is torch's fused Adam, whose steps (and moments) equal
    the per-tensor loop's to float rounding."""
    torch.manual_seed(0)
    shapes = [(48, 16), (48,), (48, 16), (16,)]
    start = [torch.randn(shape) for shape in shapes]
    fused_params, loop_params = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    fused = adam(
        [{"params": fused_params[:2], "lr": 3e-3}, {"params": fused_params[2:], "lr": 1e-3}], betas=(0.9, 0.99)
    )
    loop = torch.optim.Adam(
        [{"params": loop_params[:2], "lr": 3e-3}, {"params": loop_params[2:], "lr": 1e-3}],
        betas=(0.9, 0.99), foreach=False, fused=False,
    )  # fmt: skip
    assert fused.defaults["fused"] and adam(torch.nn.Linear(2, 2).parameters(), lr=1e-3).defaults["fused"]
    for _ in range(20):
        grads = [torch.randn(shape) for shape in shapes]
        for params, optimizer in ((fused_params, fused), (loop_params, loop)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for a, b in zip(fused_params, loop_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[a][key], loop.state[b][key], rtol=1e-6, atol=1e-7)
