"""SAE fits from the activation cache (``CachedActivationDataModule``): a fit resumed from a step checkpoint ends
bit-identical to an uninterrupted one, the checkpoint records the LLM, site and hook points as a fit from the LLM
does (so the latent sampler reads it unchanged), and validation reports the activation-space metrics."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from neurolight.datamodules import CachedActivationDataModule
from neurolight.lightning_modules.interpret.latent_sampler import LatentSampler
from neurolight.lightning_modules.sae.formats import load_sae_checkpoint
from tests.helpers.cache import TINY_SITES, harvest_tiny
from tests.helpers.sae import make_datamodule, make_module, make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cached(tiny_cache, **overrides) -> CachedActivationDataModule:
    args = dict(layer_id=1, layer_type="mlp_activations", batch_size_autoencoder=64, shuffle_rows=512, block_rows=15,
                val_contexts=16, val_batch_size=120)  # fmt: skip
    return CachedActivationDataModule(str(tiny_cache), **{**args, **overrides})


@pytest.mark.parametrize("step", [4, 8], ids=["between_resamplings", "at_a_resampling"])
def test_resume_from_a_step_checkpoint__is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_cache, step):
    torch.manual_seed(0)
    straight = make_module()
    make_trainer(tmp_path / "a", max_steps=20, ckpt_every=4, resample_every=8).fit(straight, cached(tiny_cache))
    checkpoint = tmp_path / "a" / "checkpoints" / f"step_{step:07d}.ckpt"
    assert torch.load(checkpoint, weights_only=False)["CachedActivationDataModule"]["batches"] == step
    resumed = make_module()
    make_trainer(tmp_path / "b", max_steps=20, ckpt_every=4, resample_every=8).fit(
        resumed, cached(tiny_cache), ckpt_path=checkpoint
    )
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=False)
    assert a["CachedActivationDataModule"] == b["CachedActivationDataModule"]
    for group_a, group_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(group_a[key], group_b[key]) for key in ("exp_avg", "exp_avg_sq"))


def test_checkpoint__records_the_llm_and_site_as_a_fit_from_the_llm_does(
    tmp_path, tiny_cache, cache_corpus, tiny_model_dir
):
    from_cache, from_llm = make_module(), make_module()
    make_trainer(tmp_path / "cache", max_steps=2, ckpt_every=2).fit(from_cache, cached(tiny_cache))
    make_trainer(tmp_path / "llm", max_steps=2, ckpt_every=2).fit(
        from_llm, make_datamodule(cache_corpus, tiny_model_dir)
    )
    paths = [tmp_path / run / "checkpoints" / "last.ckpt" for run in ("cache", "llm")]
    recorded = [load_sae_checkpoint(path)["datamodule_hyper_parameters"] for path in paths]
    keys = ["model_name", "layer_id", "layer_type", "num_tokens", "exclude_first_position", "llm_dtype",
            "mlp_activations_hookpoint", "mlp_sublayer_hookpoint", "attn_sublayer_hookpoint"]  # fmt: skip
    assert {k: recorded[0][k] for k in keys} == {k: recorded[1][k] for k in keys}
    assert LatentSampler(str(paths[0])).llm_settings == LatentSampler(str(paths[1])).llm_settings
    # The normalisation scalar comes from the manifest's mean norm, with no pass over the data.
    datamodule = cached(tiny_cache)
    datamodule.setup("fit")
    assert from_cache.activation_scale.item() == pytest.approx(math.sqrt(128) / datamodule.mean_activation_norm())


def test_validation__on_held_out_rows_reports_the_activation_space_metrics(tmp_path, tiny_cache):
    module = make_module()
    trainer = make_trainer(tmp_path, max_steps=6, limit_val_batches=None, val_check_interval=6,
                           check_val_every_n_epoch=None)  # fmt: skip
    datamodule = cached(tiny_cache)
    trainer.fit(module, datamodule)
    x = torch.cat(list(datamodule.val_dataloader())) * module.activation_scale
    assert len(x) == 16 * 15
    with torch.no_grad():
        x_hat = module.sae(x).x_hat
    explained = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert trainer.callback_metrics["val/explained_variance"].item() == pytest.approx(explained.item(), rel=1e-4)
    assert "val/ce_loss_recovered" not in trainer.callback_metrics


def test_bfloat16_cache__serves_bfloat16_batches_to_a_float32_sae(tmp_path, cache_corpus, tiny_model_dir):
    out = harvest_tiny(tmp_path / "bf16", cache_corpus, tiny_model_dir, sites=TINY_SITES[:1], dtype="bfloat16",
                       num_contexts=48)  # fmt: skip
    dtypes = set()
    record = pl.callbacks.LambdaCallback(on_train_batch_start=lambda t, m, batch, i: dtypes.add(batch.dtype))
    module = make_module()
    trainer = make_trainer(tmp_path / "run", max_steps=4)
    trainer.callbacks.append(record)
    trainer.fit(module, cached(out))
    assert dtypes == {torch.bfloat16} and {p.dtype for p in module.parameters()} == {torch.float32}
    assert torch.isfinite(module.sae.W_enc).all() and trainer.global_step == 4
