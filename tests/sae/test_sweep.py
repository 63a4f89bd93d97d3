"""Many SAEs from one stream of activations (issue 13, part 3): a sweep trains each member as its separate fit would,
resumes exactly, keeps one metric namespace, histogram and resampler state per member, and loads one member back."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from neurolight.callbacks import DeadLatentResampler, SaeCheckpoint
from neurolight.lightning_modules import (
    BatchTopK,
    ReLU,
    SparseAutoencoder,
    SparseAutoencoderModule,
    SparseAutoencoderSweep,
    SweepMember,
    TopK,
)
from tests.helpers.sae import synthetic_sparse_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MEMBERS = [
    SweepMember("topk_k4", 64, TopK(k=4, k_aux=8), learning_rate=3e-3),
    SweepMember(
        "relu", 96, ReLU(l1_coefficient=1e-3), learning_rate=1e-3, lr_warmup_steps=5, decoder_lr_multiplier=2.0
    ),
    SweepMember("batchtopk_k6", 64, BatchTopK(k=6, k_aux=8)),
]
SHARED = dict(learning_rate=2e-3, dead_tokens_threshold=512, metrics_every_n_steps=5, max_l0_fraction=None)
DATA = synthetic_sparse_data(4096, seed=0)


def trainer(root: Path, steps: int, every: int = 1000) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, default_root_dir=str(root), log_every_n_steps=5,
        logger=pl.loggers.CSVLogger(str(root), name="logs", version=0), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[SaeCheckpoint(batches_between_ckpt=every, dirpath=str(root / "checkpoints")),
                   DeadLatentResampler(method="anthropic", neuron_resampling_interval=6, num_resampling_inputs=512)],
    )  # fmt: skip


def loader() -> DataLoader:
    return DataLoader(TensorDataset(DATA), batch_size=128)  # in order: every fit sees the same batches


def sweep() -> SparseAutoencoderSweep:
    torch.manual_seed(0)
    return SparseAutoencoderSweep(32, MEMBERS, **SHARED)


def separate_modules() -> dict[str, SparseAutoencoderModule]:
    """The members as single modules, built in the sweep's order from the same seed (so with the same weights)."""
    torch.manual_seed(0)
    return {
        m.name: SparseAutoencoderModule(
            32, m.dict_vec_size, m.architecture, learning_rate=m.learning_rate or SHARED["learning_rate"],
            lr_warmup_steps=m.lr_warmup_steps or 0, decoder_lr_multiplier=m.decoder_lr_multiplier,
            **{k: v for k, v in SHARED.items() if k != "learning_rate"},
        )
        for m in MEMBERS
    }  # fmt: skip


def test_sweep__each_member_ends_as_its_separate_fit_on_the_same_batches(tmp_path):
    together = sweep()
    trainer(tmp_path / "sweep", 24).fit(together, loader())
    for name, module in separate_modules().items():
        trainer(tmp_path / name, 24).fit(module, loader())
        for key, value in module.state_dict().items():
            torch.testing.assert_close(together.units[name].state_dict()[key], value, msg=f"{name}.{key}")
    # One namespace per member in the logs, and a histogram per member next to each checkpoint.
    with (tmp_path / "sweep" / "logs" / "version_0" / "metrics.csv").open() as file:
        columns = next(csv.reader(file))
    for name in together.units:
        assert {f"{name}/train/loss", f"{name}/train/l0", f"{name}/train/resampled"} <= set(columns)
        assert (tmp_path / "sweep" / "checkpoints" / f"last_{name}_feature_density.png").stat().st_size > 1000


def test_sweep__from_the_cache_resumed_from_a_step_checkpoint_ends_bit_identical(tmp_path, tiny_cache):
    """A sweep reading the activation cache once for all members; a fit resumed from a step checkpoint continues at
    the right row with every member's state, the resampler's and the histogram windows'."""
    from neurolight.datamodules import CachedActivationDataModule

    def cached():
        args = dict(layer_id=1, layer_type="mlp_activations", batch_size_autoencoder=64, shuffle_rows=512)
        return CachedActivationDataModule(str(tiny_cache), block_rows=15, val_contexts=16, **args)

    def members():
        torch.manual_seed(0)
        return SparseAutoencoderSweep(128, [SweepMember("k4", 192, TopK(k=4)), SweepMember("k8", 256, TopK(k=8))],
                                      **SHARED)  # fmt: skip

    straight = members()
    trainer(tmp_path / "a", 16, every=4).fit(straight, cached())
    resumed = members()
    trainer(tmp_path / "a", 16, every=4).fit(resumed, cached(), ckpt_path=tmp_path / "a/checkpoints/step_0000008.ckpt")
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_sweep__one_member_loads_like_a_single_sae(tmp_path):
    together = sweep()
    trainer(tmp_path, 12).fit(together, loader())
    member = SparseAutoencoder.from_pretrained(tmp_path / "checkpoints" / "last.ckpt", name="relu")
    unit = together.units["relu"].eval()
    x = DATA[:64] * 1.7
    with torch.no_grad():
        torch.testing.assert_close(member.encode(x), unit.sae.encode(unit.normalize(x)), atol=1e-5, rtol=1e-5)
    assert member.metadata.activation_scale == pytest.approx(float(unit.activation_scale))
    with pytest.raises(ValueError, match=r"a sweep of 3 SAEs and no name was given; name one of: topk_k4, relu"):
        SparseAutoencoder.from_pretrained(tmp_path / "checkpoints" / "last.ckpt")


def test_decoder_lr_multiplier__scales_the_decoder_weights_first_adam_step_only(tmp_path):
    """Adam's first step is lr * g / (|g| + eps) per entry, so with an unconstrained decoder (JumpReLU) and the same
    batch, a multiplier m moves the decoder weight m times as far and every other parameter as far as without."""
    from neurolight.lightning_modules import JumpReLU

    def one_step(multiplier: float) -> tuple[dict, dict]:
        torch.manual_seed(0)
        module = SparseAutoencoderModule(32, 64, JumpReLU(l0_coefficient=0.1, init_threshold=0.1),
                                         decoder_lr_multiplier=multiplier, **SHARED)  # fmt: skip
        before = {key: value.clone() for key, value in module.sae.named_parameters()}
        trainer(tmp_path / str(multiplier), 1).fit(module, loader())
        return before, dict(module.sae.named_parameters())

    before, plain = one_step(1.0)
    same_init, tripled = one_step(3.0)
    for name, value in before.items():
        torch.testing.assert_close(same_init[name], value)
        step, step_3 = plain[name].detach() - value, tripled[name].detach() - value
        assert step.abs().max() > 0, name
        torch.testing.assert_close(step_3, step * (3.0 if name == "W_dec" else 1.0), atol=1e-7, rtol=1e-4)
    with pytest.raises(ValueError, match=r"decoder_lr_multiplier must be > 0, got 0"):
        SparseAutoencoderModule(32, 64, decoder_lr_multiplier=0)


def test_decoder_lr_multiplier__a_resumed_fit_keeps_the_checkpoints_and_continues_exactly(tmp_path, tiny_cache):
    """The optimizer state holds the groups its multiplier made (one at m = 1): a fit resumed under another multiplier
    takes the checkpoint's, with a warning, and ends as the uninterrupted fit; so do a sweep's members. (From the
    cache, whose stream resumes at the right row.)"""
    from neurolight.datamodules import CachedActivationDataModule

    def cached():
        args = dict(layer_id=1, layer_type="mlp_activations", batch_size_autoencoder=64, shuffle_rows=512)
        return CachedActivationDataModule(str(tiny_cache), block_rows=15, val_contexts=16, **args)

    def single(multiplier: float) -> SparseAutoencoderModule:
        torch.manual_seed(0)
        return SparseAutoencoderModule(128, 192, TopK(k=4), decoder_lr_multiplier=multiplier, **SHARED)

    def resume(straight, resumed, root: Path, warning: str) -> None:
        trainer(root / "a", 12, every=4).fit(straight, cached())
        with pytest.warns(UserWarning, match=warning):
            trainer(root / "b", 12).fit(resumed, cached(), ckpt_path=root / "a/checkpoints/step_0000008.ckpt")
        for key, value in straight.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value), key

    for saved, configured in [(1.0, 2.0), (3.0, 1.0), (2.0, 3.0)]:
        resumed = single(configured)
        warning = rf"decoder_lr_multiplier={configured} replaced by the checkpoint's {saved}"
        resume(single(saved), resumed, tmp_path / f"single_{saved}_{configured}", warning)
        assert resumed.hparams.decoder_lr_multiplier == saved

    def members(multipliers: list[float | None], default: float) -> SparseAutoencoderSweep:
        torch.manual_seed(0)
        units = [SweepMember(f"k{k}", 192, TopK(k=k), decoder_lr_multiplier=m) for k, m in zip((4, 8), multipliers)]
        return SparseAutoencoderSweep(128, units, **SHARED, decoder_lr_multiplier=default)

    resumed = members([None, None], 3.0)  # saved: k4 at the sweep's 1, k8 at its own 2
    resume(members([None, 2.0], 1.0), resumed, tmp_path / "sweep", r"k4: decoder_lr_multiplier=3.0 replaced by")
    assert [unit.hparams.decoder_lr_multiplier for unit in resumed.units.values()] == [1.0, 2.0]
    assert [member["decoder_lr_multiplier"] for member in resumed.hparams["saes"]] == [1.0, 2.0]


def test_decoder_lr_multiplier__defaults_to_the_architectures_and_checkpoints_record_the_value(tmp_path):
    """2 for the TopK family with a unit-norm decoder, 1 for free decoder rows and the L1 / JumpReLU SAEs; a sweep
    member without one takes the sweep's, else its own architecture's; the hyperparameters hold the number."""
    from neurolight.lightning_modules import JumpReLU, MatryoshkaBatchTopK

    cases = [(TopK(k=4), 2.0), (BatchTopK(k=4), 2.0), (MatryoshkaBatchTopK(k=4, group_sizes=[16, 48]), 2.0),
             (TopK(k=4, decoder_init_norm=0.1), 1.0), (ReLU(), 1.0), (JumpReLU(), 1.0)]  # fmt: skip
    for architecture, expected in cases:
        module = SparseAutoencoderModule(32, 64, architecture)
        assert module.hparams.decoder_lr_multiplier == expected, architecture
        assert len(module.parameter_groups()) == (1 if expected == 1 else 2)
    units = [SweepMember("topk", 64, TopK(k=4)), SweepMember("relu", 64, ReLU()),
             SweepMember("own", 64, ReLU(), decoder_lr_multiplier=3.0)]  # fmt: skip
    by_architecture = SparseAutoencoderSweep(32, units)
    assert [c["decoder_lr_multiplier"] for c in by_architecture.hparams["saes"]] == [2.0, 1.0, 3.0]
    assert [u.hparams.decoder_lr_multiplier for u in by_architecture.units.values()] == [2.0, 1.0, 3.0]
    swept = SparseAutoencoderSweep(32, units, decoder_lr_multiplier=1.5)
    assert [c["decoder_lr_multiplier"] for c in swept.hparams["saes"]] == [1.5, 1.5, 3.0]
    trainer(tmp_path, 2, every=1).fit(by_architecture, loader())
    saved = torch.load(tmp_path / "checkpoints" / "step_0000002.ckpt", weights_only=False)["hyper_parameters"]
    assert [c["decoder_lr_multiplier"] for c in saved["saes"]] == [2.0, 1.0, 3.0]
    # What loggers write (hparams.yaml) holds the numbers too.
    assert [c["decoder_lr_multiplier"] for c in by_architecture.hparams_initial["saes"]] == [2.0, 1.0, 3.0]
    assert SparseAutoencoderModule(32, 64, TopK(k=4)).hparams_initial["decoder_lr_multiplier"] == 2.0


def test_decoder_lr_multiplier__a_checkpoint_from_before_the_setting_loads_at_1_and_resumes_there(tmp_path):
    """A checkpoint without the setting trained at 1: load_from_checkpoint takes that silently (nothing resumes);
    a resumed fit at the TopK default 2 warns, naming the default, and continues at 1."""
    import warnings

    module = SparseAutoencoderModule(32, 64, TopK(k=4), decoder_lr_multiplier=1.0, **SHARED)
    trainer(tmp_path / "a", 2, every=2).fit(module, loader())
    path = tmp_path / "a" / "checkpoints" / "step_0000002.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["hyper_parameters"]["decoder_lr_multiplier"]  # as written before the setting existed
    torch.save(checkpoint, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = SparseAutoencoderModule.load_from_checkpoint(path)
    assert loaded.hparams.decoder_lr_multiplier == 1.0
    resumed = SparseAutoencoderModule(32, 64, TopK(k=4), **SHARED)
    with pytest.warns(UserWarning, match=r"decoder_lr_multiplier=2.0 \(the architecture's default\) replaced by the "
                                         r"checkpoint's 1.0"):  # fmt: skip
        trainer(tmp_path / "b", 4).fit(resumed, loader(), ckpt_path=path)
    assert resumed.hparams.decoder_lr_multiplier == 1.0


def test_decoder_lr_multiplier__under_a_strategy_that_restores_after_setup_a_difference_is_an_error():
    from types import SimpleNamespace

    from neurolight.lightning_modules.sae.checkpoint_args import resume_decoder_lr_multiplier

    module = SparseAutoencoderModule(32, 64, TopK(k=4), decoder_lr_multiplier=2.0)
    deepspeed = SimpleNamespace(strategy=SimpleNamespace(restore_checkpoint_after_setup=True))
    checkpoint = {"hyper_parameters": {"act_vec_size": 32}}  # written before the setting: trained at 1
    with pytest.raises(ValueError, match=r"trained with decoder_lr_multiplier=1.0, the configuration sets 2.0; .* "
                                         r"resume with decoder_lr_multiplier: 1.0"):  # fmt: skip
        resume_decoder_lr_multiplier({"": module}, checkpoint, deepspeed)


def test_sweep__bad_members_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"names relu more than once; give every SAE its own name"):
        SparseAutoencoderSweep(32, [MEMBERS[1], MEMBERS[1]])
    with pytest.raises(ValueError, match=r"k=80 is out of range; it must be between 1 and d_sae=64"):
        SparseAutoencoderSweep(32, [SweepMember("wide_k", 64, TopK(k=80))])


def test_summary__of_a_sweep_is_one_row_per_member_and_of_one_sae_a_line_per_metric(tmp_path):
    from types import SimpleNamespace

    callback = SaeCheckpoint(dirpath=str(tmp_path))
    callback.written = [str(tmp_path / "last.ckpt")]
    metrics = {"k16/train/l0": 16.0, "k16/train/explained_variance": 0.5, "k128_w4608/train/l0": 128.0,
               "k128_w4608/val/explained_variance": 0.75}  # fmt: skip
    trainer = SimpleNamespace(callback_metrics={k: torch.tensor(v) for k, v in metrics.items()}, logger=None)
    callback.fired = {"k16": torch.zeros(2), "k128_w4608": torch.zeros(2)}
    lines = callback.summary(trainer).splitlines()
    assert lines[3] == f"  histograms: {tmp_path / 'last_{name}_feature_density.png'}"
    assert lines[4].split() == ["member", "train/l0", "train/explained_variance", "val/explained_variance"]
    assert lines[5].split() == ["k16", "16", "0.5", "-"] and lines[6].split() == ["k128_w4608", "128", "-", "0.75"]
    callback.fired = {"": torch.zeros(2)}
    trainer.callback_metrics = {"train/l0": torch.tensor(32.0)}
    assert callback.summary(trainer).splitlines()[-2:] == [
        f"  histogram:  {tmp_path / 'last_feature_density.png'}",
        "  train/l0: 32",
    ]
