"""A sweep whose SAEs read different sites (issue 13, part 3), as sparsify trains all layers at once: one forward pass
(or one read of the cache) serves every site's rows of the same tokens, each member trains as its separate fit on
its site would, and each member records its own site for loading, sampling and interpretation."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from neurolight.callbacks import DeadLatentResampler, SaeCheckpoint
from neurolight.datamodules import ActivationDataModule, CachedActivationDataModule
from neurolight.lightning_modules import (
    ReLU,
    SparseAutoencoder,
    SparseAutoencoderModule,
    SparseAutoencoderSweep,
    SweepMember,
    TopK,
)
from tests.helpers.cache import TINY_SITES
from tests.helpers.sae import make_datamodule

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MLP, ATTN = TINY_SITES  # layers.1.mlp_activations (128 wide), layers.0.attn_sublayer (64 wide)
WIDTHS = {MLP: 128, ATTN: 64}
MEMBERS = [
    SweepMember("mlp_k4", 192, TopK(k=4, k_aux=8), site=MLP, act_vec_size=128),
    SweepMember("attn_relu", 96, ReLU(l1_coefficient=1e-3), site=ATTN, act_vec_size=64, learning_rate=1e-3),
    SweepMember("attn_k6", 128, TopK(k=6, k_aux=8), site=ATTN, act_vec_size=64),
]
SHARED = dict(learning_rate=2e-3, dead_tokens_threshold=512, metrics_every_n_steps=4, max_l0_fraction=None)


def trainer(root, steps: int, **overrides) -> pl.Trainer:
    args = dict(
        max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, default_root_dir=str(root), log_every_n_steps=4,
        logger=pl.loggers.CSVLogger(str(root), name="logs", version=0), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[SaeCheckpoint(batches_between_ckpt=1000, dirpath=str(root / "checkpoints")),
                   DeadLatentResampler(method="anthropic", neuron_resampling_interval=5, num_resampling_inputs=256)],
    )  # fmt: skip
    return pl.Trainer(**{**args, **overrides})


def cached(cache, **site) -> CachedActivationDataModule:
    return CachedActivationDataModule(str(cache), batch_size_autoencoder=64, shuffle_rows=512, block_rows=15,
                                      val_contexts=16, **site)  # fmt: skip


def sweep() -> SparseAutoencoderSweep:
    torch.manual_seed(0)
    return SparseAutoencoderSweep(None, MEMBERS, **SHARED)


def separate_modules() -> dict[str, SparseAutoencoderModule]:
    """The members as single modules on one site each, built in the sweep's order from the same seed."""
    torch.manual_seed(0)
    return {
        m.name: SparseAutoencoderModule(
            m.act_vec_size, m.dict_vec_size, m.architecture, learning_rate=m.learning_rate or SHARED["learning_rate"],
            **{k: v for k, v in SHARED.items() if k != "learning_rate"},
        )
        for m in MEMBERS
    }  # fmt: skip


def test_sweep_over_sites_from_the_cache__each_member_ends_as_its_separate_fit_on_its_site(tmp_path, tiny_cache):
    together = sweep()
    trainer(tmp_path / "sweep", 15).fit(together, cached(tiny_cache, sites=TINY_SITES))
    for member, module in zip(MEMBERS, separate_modules().values()):
        layer_type, layer_id = member.site.split(".")[2], int(member.site.split(".")[1])
        trainer(tmp_path / member.name, 15).fit(module, cached(tiny_cache, layer_type=layer_type, layer_id=layer_id))
        for key, value in module.state_dict().items():
            torch.testing.assert_close(together.units[member.name].state_dict()[key], value, msg=f"{member.name}.{key}")
    # Each member reads back with its own site, as sampling and interpretation look it up.
    checkpoint = tmp_path / "sweep" / "checkpoints" / "last.ckpt"
    attn = SparseAutoencoder.from_pretrained(checkpoint, name="attn_k6")
    assert (attn.d_in, attn.metadata.layer_type, attn.metadata.layer_id) == (64, "attn_sublayer", 0)
    assert attn.metadata.training["decoder_lr_multiplier"] == 2.0  # TopK's default, recorded per member
    assert attn.metadata.hook_name == "model.layers.0.self_attn"
    mlp = SparseAutoencoder.from_pretrained(checkpoint, name="mlp_k4")
    assert (mlp.d_in, mlp.metadata.layer_type, mlp.metadata.layer_id) == (128, "mlp_activations", 1)


def test_several_sites_from_the_llm__one_forward_serves_each_sites_rows_of_the_same_tokens(
    cache_corpus, tiny_model_dir
):
    together = make_datamodule(cache_corpus, tiny_model_dir, sites=TINY_SITES)
    together.setup("fit")
    assert together.site_widths == WIDTHS
    alone = {}
    for site in TINY_SITES:
        alone[site] = make_datamodule(cache_corpus, tiny_model_dir, layer_type=site.split(".")[2],
                                      layer_id=int(site.split(".")[1]))  # fmt: skip
        alone[site].setup("fit")
    for _ in range(8):  # more than a buffer's worth: the refills read the same contexts in the same order
        batch = together._next_train_batch()
        for site in TINY_SITES:
            torch.testing.assert_close(batch[site], alone[site]._next_train_batch(), rtol=1e-5, atol=1e-6)
    assert together.mean_activation_norm(ATTN) == pytest.approx(alone[ATTN].mean_activation_norm(), rel=1e-5)


def test_several_sites_with_compile_llm__one_compiled_forward_serves_the_same_rows(
    cache_corpus, tiny_model_dir, monkeypatch
):
    compiles = []

    def fake_compile(fn, **kwargs):  # records the call; tests/llm/test_sites_reader.py runs inductor itself
        compiles.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled = make_datamodule(cache_corpus, tiny_model_dir, sites=TINY_SITES, compile_llm=True)
    compiled.setup("fit")
    assert len(compiles) == 1 and compiled.sites_reader.compiled  # the sites' one forward, not one per site
    compiled.setup("validate")  # set up already: no second model, buffer or compilation
    assert len(compiles) == 1
    plain = make_datamodule(cache_corpus, tiny_model_dir, sites=TINY_SITES)
    plain.setup("fit")
    for _ in range(8):
        batch, expected = compiled._next_train_batch(), plain._next_train_batch()
        for site in TINY_SITES:
            assert torch.equal(batch[site], expected[site]), site


def test_sweep_over_sites_from_the_llm__validation_splices_each_member_at_its_site(
    tmp_path, cache_corpus, tiny_model_dir, monkeypatch
):
    from neurolight.datamodules.llm.hooked import HookedLLM

    datamodule = make_datamodule(cache_corpus, tiny_model_dir, sites=TINY_SITES)
    run = trainer(tmp_path, 10, limit_val_batches=1, val_check_interval=10)
    together = sweep()
    calls, reference_logits = [], HookedLLM.reference_logits
    monkeypatch.setattr(HookedLLM, "reference_logits", lambda self, *a: calls.append(self.layer_type) or
                        reference_logits(self, *a))  # fmt: skip
    run.fit(together, datamodule)
    # The two members at the attention output share its activations and its clean and zero-ablated logits.
    assert sorted(calls) == ["attn_sublayer", "mlp_activations"]
    # The one validation batch (after the last step), spliced by hand at each member's site with its final weights.
    ids = next(iter(datamodule.val_dataloader()))
    for member in MEMBERS:
        unit, hooked = together.units[member.name], datamodule.hooked_llm_at(member.site)
        assert hooked.layer_type == member.site.split(".")[2]
        expected = hooked.splice_metrics(ids, unit.reconstruct, skip_first_position=True)
        for name in ("ce_loss_recovered", "kl", "ce_spliced"):
            logged = run.callback_metrics[f"{member.name}/val/{name}"]
            torch.testing.assert_close(logged, expected[name], rtol=1e-4, atol=1e-6, msg=f"{member.name} {name}")
    member = SparseAutoencoder.from_pretrained(tmp_path / "checkpoints" / "last.ckpt", name="attn_relu")
    assert (member.metadata.layer_type, member.metadata.layer_id, member.metadata.model_name) == (
        "attn_sublayer", 0, str(tiny_model_dir))  # fmt: skip


def test_sites__bad_settings_are_refused_in_one_line(tmp_path, tiny_cache, cache_corpus, tiny_model_dir):
    def fit(members, **kw):
        trainer(tmp_path, 1).fit(SparseAutoencoderSweep(None, members, **SHARED), cached(tiny_cache, **kw))

    with pytest.raises(ValueError, match=r"member x's site is layers.0.resid_post, but CachedActivationDataModule "
                                         r"serves layers.1.mlp_activations, layers.0.attn_sublayer"):  # fmt: skip
        fit([SweepMember("x", 64, TopK(k=4), site="layers.0.resid_post", act_vec_size=64)], sites=TINY_SITES)
    with pytest.raises(ValueError, match=r"at layers.1.mlp_activations have d_in=128, but the SAE expects "
                                         r"act_vec_size=64; set sweep member x's act_vec_size: 128"):  # fmt: skip
        fit([SweepMember("x", 64, TopK(k=4), site=MLP, act_vec_size=64)], sites=TINY_SITES)
    with pytest.raises(ValueError, match=r"serves the sites layers.1.mlp_activations, layers.0.attn_sublayer; set "
                                         r"sweep member x's site"):  # fmt: skip
        fit([SweepMember("x", 64, TopK(k=4), act_vec_size=64)], sites=TINY_SITES)
    with pytest.raises(ValueError, match=r"members x have no act_vec_size; set the sweep's act_vec_size or theirs"):
        SparseAutoencoderSweep(None, [SweepMember("x", 64, TopK(k=4))])
    with pytest.raises(ValueError, match=r"give either sites .* or layer_id and layer_type, not both"):
        cached(tiny_cache, sites=TINY_SITES, layer_id=1)
    with pytest.raises(ValueError, match=r"holds no site layers.0.resid_post .*; choose among those, or harvest"):
        cached(tiny_cache, sites=[MLP, "layers.0.resid_post"]).setup("fit")
    with pytest.raises(ValueError, match=r"sites names layers.0.attn_sublayer more than once"):
        ActivationDataModule(str(cache_corpus), sites=[ATTN, ATTN])


def test_sweep_over_sites_through_the_cli__members_keep_their_own_settings(tmp_path, cache_corpus, tiny_model_dir,
                                                                          monkeypatch):  # fmt: skip
    """Under LightningCLI every module built while the sweep is instantiated would record the sweep's arguments as its
    own; each member must keep its learning rate, width and site, in its module and in the checkpoint."""
    import sys

    import yaml

    from neurolight.cli.main import run

    monkeypatch.setattr(sys, "argv", ["neurolight"])
    recipe = yaml.safe_load((Path(__file__).parents[2] / "configs/sae/sweep-sites-demo.yaml").read_text())
    recipe["trainer"].update(max_steps=3, val_check_interval=3, default_root_dir=str(tmp_path), accelerator="cpu")
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    recipe["model"]["init_args"].update(act_vec_size=None, lr_warmup_steps=0, saes=[
        {"name": "mlp", "site": MLP, "act_vec_size": 128, "dict_vec_size": 192, "learning_rate": 0.003,
         "architecture": {"class_path": "neurolight.lightning_modules.TopK", "init_args": {"k": 4}}},
        {"name": "attn", "site": ATTN, "act_vec_size": 64, "dict_vec_size": 96,
         "architecture": {"class_path": "neurolight.lightning_modules.TopK", "init_args": {"k": 4}}},
    ])  # fmt: skip
    recipe["data"]["init_args"].update(dataset_path=str(cache_corpus), model_name=str(tiny_model_dir), sites=TINY_SITES,
                                       num_tokens=16, batch_size_llm=8, batch_size_autoencoder=64,
                                       num_batches_preload=6, val_contexts=16)  # fmt: skip
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(recipe))
    cli = run(["fit", "--config", str(config)])
    units = cli.model.units
    assert (units["mlp"].hparams.learning_rate, units["attn"].hparams.learning_rate) == (0.003, 0.001)
    assert (units["mlp"].hparams.dict_vec_size, units["attn"].hparams.site) == (192, ATTN)
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    # Per member: every parameter at its learning rate, the decoder at TopK's default multiple of it (2).
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [group["lr"] for group in groups] == pytest.approx([0.003, 0.006, 0.001, 0.002])
    attn = SparseAutoencoder.from_pretrained(next(tmp_path.rglob("last.ckpt")), name="attn")
    assert (attn.d_in, attn.metadata.layer_type, attn.metadata.layer_id) == (64, "attn_sublayer", 0)
    assert attn.metadata.training["decoder_lr_multiplier"] == 2.0  # TopK's default, recorded per member


def test_sweep_over_sites_from_the_llm__resumed_from_a_step_checkpoint_ends_bit_identical(
    tmp_path, cache_corpus, tiny_model_dir
):
    """The mixing buffer holds every site's rows side by side; a resume restores it, and the batches in flight,
    with every member's state and the resampler's per-site inputs."""

    def fit(root, ckpt_path=None):
        checkpoints = SaeCheckpoint(batches_between_ckpt=4, dirpath=str(root / "checkpoints"))
        resampler = DeadLatentResampler(method="anthropic", neuron_resampling_interval=5, num_resampling_inputs=256)
        run = trainer(root, 12, callbacks=[checkpoints, resampler])
        together = sweep()
        run.fit(together, make_datamodule(cache_corpus, tiny_model_dir, sites=TINY_SITES), ckpt_path=ckpt_path)
        return together

    straight = fit(tmp_path / "a")
    resumed = fit(tmp_path / "a", ckpt_path=tmp_path / "a" / "checkpoints" / "step_0000008.ckpt")
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
