"""Dead-latent resampling resets what the architecture names: JumpReLU's thresholds of the revived latents (and their
Adam moments), BatchTopK's running threshold; in one process and under DeepSpeed ZeRO-3."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from neurolight.callbacks import DeadLatentResampler
from neurolight.datamodules.llm import zero
from neurolight.lightning_modules import BatchTopK, JumpReLU, TopK
from tests.helpers.sae import build_tiny_corpus, make_datamodule, make_module, make_trainer

# DeepSpeed's ZeRO collectives call torch.distributed functions that torch has renamed.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")

KILLED = torch.arange(0, 256, 4)
KILL_AT, RESAMPLE_EVERY, MAX_STEPS = 2, 5, 12
# Threshold and bandwidth at the scale of the tiny model's normalised pre-activations (about unit variance), so
# the thresholds get gradients (and Adam moments) before the latents are killed.
JUMPRELU = JumpReLU(l0_coefficient=0.1, bandwidth=0.5, init_threshold=0.5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    return build_tiny_corpus(tmp_path_factory.mktemp("resampling-corpus"), tiny_model_dir)


class KillThenRecord(pl.Callback):
    """Silences ``KILLED`` after step ``KILL_AT``; records the architecture's tensors (and the Adam moments of
    parameters) at the killed latents one step before the last resampling and right after it (this callback runs
    after the resampler)."""

    def __init__(self, name: str, step: int) -> None:
        self.name, self.step, self.records = name, step, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        sae, step = pl_module.sae, trainer.global_step
        if step == KILL_AT:
            zero.update_param(sae.b_enc, lambda b: b.index_fill(0, KILLED.to(b.device), -1e4))
        if step in (self.step - 1, self.step):
            tensor = getattr(sae, self.name)
            record = {"value": (zero.full_param(tensor) if tensor.ndim else tensor).detach().clone()}
            if isinstance(tensor, torch.nn.Parameter):
                record.update(moments_of(trainer, tensor))
            self.records[step] = record


def moments_of(trainer, param) -> dict[str, torch.Tensor]:
    if zero.zero_stage(param):
        from deepspeed.utils import safe_get_full_optimizer_state

        return {key: safe_get_full_optimizer_state(param, key).clone() for key in ("exp_avg", "exp_avg_sq")}
    state = trainer.optimizers[0].state[param]
    return {key: state[key].clone() for key in ("exp_avg", "exp_avg_sq")}


def fit(root, corpus, model_dir, architecture, name: str, **trainer_args) -> KillThenRecord:
    torch.manual_seed(0)
    module = make_module(architecture=architecture)
    recorder = KillThenRecord(name, step=2 * RESAMPLE_EVERY)
    trainer = make_trainer(root, max_steps=MAX_STEPS, **trainer_args)
    trainer.callbacks += [DeadLatentResampler(method="anthropic", neuron_resampling_interval=RESAMPLE_EVERY), recorder]
    trainer.fit(module, make_datamodule(corpus, model_dir))
    recorder.module = module
    return recorder


def test_resampler__resets_jumprelu_thresholds_and_their_adam_moments_of_revived_latents(
    tmp_path, corpus, tiny_model_dir
):
    records = fit(tmp_path, corpus, tiny_model_dir, JUMPRELU, "log_threshold").records
    before, after = records[9], records[10]
    live = torch.ones(256, dtype=torch.bool)
    live[KILLED] = False
    assert not torch.allclose(before["value"][KILLED], torch.full((len(KILLED),), math.log(0.5)))
    torch.testing.assert_close(after["value"][KILLED], torch.full((len(KILLED),), math.log(0.5)))
    reset = after["value"] == torch.tensor(math.log(0.5))
    assert reset[KILLED].all() and reset[live].float().mean() < 0.1  # live thresholds keep what they learned
    for key in ("exp_avg", "exp_avg_sq"):
        assert before[key][KILLED].abs().sum() > 0 and torch.all(after[key][KILLED] == 0), key
        assert after[key][live].abs().sum() > 0, key


def test_resampler__resets_the_batchtopk_threshold_which_the_next_batch_estimates_again(
    tmp_path, corpus, tiny_model_dir
):
    recorder = fit(tmp_path, corpus, tiny_model_dir, BatchTopK(k=8), "threshold")
    assert recorder.records[9]["value"] > 0 and recorder.records[10]["value"] == -1
    assert recorder.module.sae.threshold > 0  # estimated again by the steps after the resampling


def test_resampler__free_decoder_norms_stay_free_and_revived_rows_take_the_live_rows_mean_norm(
    tmp_path, corpus, tiny_model_dir
):
    recorder = fit(tmp_path, corpus, tiny_model_dir, TopK(k=8, decoder_init_norm=0.1), "W_dec")
    before, after = recorder.records[9]["value"], recorder.records[10]["value"]
    live = torch.ones(256, dtype=torch.bool)
    live[KILLED] = False
    norms = after.norm(dim=1)
    assert (before.norm(dim=1) - 1).abs().min() > 0.1  # trained from 0.1, never renormalised to 1
    torch.testing.assert_close(norms[KILLED], norms[live].mean().expand(len(KILLED)))
    assert not torch.allclose(before[KILLED], after[KILLED])


def test_zero3__resampling_a_jumprelu_sae_matches_the_single_device_run(
    tmp_path, corpus, tiny_model_dir, single_process_group
):
    pytest.importorskip("deepspeed")
    from tests.helpers.cpu_deepspeed import CpuDeepSpeedStrategy

    single = fit(tmp_path / "single", corpus, tiny_model_dir, JUMPRELU, "log_threshold")
    sharded = fit(
        tmp_path / "zero3",
        corpus,
        tiny_model_dir,
        JUMPRELU,
        "log_threshold",
        strategy=CpuDeepSpeedStrategy(stage=3, logging_batch_size_per_gpu=1),
        precision="32-true",
    )
    assert zero.zero_stage(sharded.module.sae.log_threshold) == 3
    for step in (9, 10):
        for key, value in single.records[step].items():
            torch.testing.assert_close(sharded.records[step][key], value, atol=1e-5, rtol=1e-4, msg=f"{step} {key}")
    torch.testing.assert_close(sharded.records[10]["value"][KILLED], torch.full((len(KILLED),), math.log(0.5)))
