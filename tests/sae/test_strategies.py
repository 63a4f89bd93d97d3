"""configs/trainer/deepspeed.yaml on CPU: a tiny SAE trains under ZeRO stage 2 and 3 with dead-latent resampling
and a unit-norm decoder, whose edits reach the partitioned fp32 master weights, gradients and Adam moments through
``neurolight.datamodules.llm.zero``.

Runs in one CPU process through ``tests.helpers.cpu_deepspeed.CpuDeepSpeedStrategy`` (gloo), without building
DeepSpeed's
shared-memory communication extension.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from neurolight.callbacks import DeadLatentResampler
from neurolight.datamodules.llm import zero
from neurolight.lightning_modules.sae.metrics import explained_variance
from tests.helpers.sae import build_tiny_corpus, make_datamodule, make_module, make_trainer

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.utils import safe_get_full_grad, safe_get_full_optimizer_state  # noqa: E402

from tests.helpers.cpu_deepspeed import CpuDeepSpeedStrategy  # noqa: E402

# DeepSpeed's ZeRO collectives call torch.distributed functions that torch has renamed.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")

OVERLAY = Path(__file__).parents[2] / "configs" / "trainer" / "deepspeed.yaml"
KILL_AT, RESAMPLE_EVERY, LAST_RESAMPLING, MAX_STEPS = 1, 5, 10, 30
KILLED = torch.arange(0, 256, 4)
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def overlay_trainer_settings() -> tuple[dict, str]:
    """The strategy init_args and the precision of the DeepSpeed overlay, as a CLI run gets them."""
    trainer = yaml.safe_load(OVERLAY.read_text())["trainer"]
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    return dict(trainer["strategy"].get("init_args", {})), trainer["precision"]


class KillLatents(pl.Callback):
    """After step ``at``, sets b_enc = -1e4 at ``rows``: those latents never fire again, yet they already have
    Adam moments, which resampling must reset. Latents dead from the start would have zero moments anyway."""

    def __init__(self, at: int, rows: torch.Tensor) -> None:
        self.at, self.rows = at, rows

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            zero.update_param(pl_module.sae.b_enc, lambda b: b.index_fill(0, self.rows.to(b.device), -1e4))


class SnapshotResampledRows(pl.Callback):
    """Copies, after the resampler ran (it is added after it), the ZeRO-partitioned state of ``rows`` at the
    step before the last resampling and at that step."""

    def __init__(self, step: int, rows: torch.Tensor) -> None:
        self.step, self.rows = step, rows
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step not in (self.step - 1, self.step):
            return
        sae = pl_module.sae
        snapshot = {
            "b_enc": zero.full_param(sae.b_enc)[self.rows].clone(),
            "decoder_norms": zero.full_param(sae.W_dec)[self.rows].norm(dim=1),
        }
        for name in ("W_enc", "W_dec", "b_enc"):
            for key in ADAM_MOMENTS:
                snapshot[f"{name}.{key}"] = safe_get_full_optimizer_state(getattr(sae, name), key)[self.rows].clone()
        self.snapshots[trainer.global_step] = snapshot


def record_projected_decoder_grads(module) -> list[tuple[float, float]]:
    """Wraps the module's on_before_optimizer_step; after it ran, records (|grad|, largest component of a
    decoder-row gradient along its row), read from DeepSpeed's gradient partitions."""
    records: list[tuple[float, float]] = []
    original = module.on_before_optimizer_step

    def checked(optimizer) -> None:
        original(optimizer)
        grad = safe_get_full_grad(module.sae.W_dec)
        if grad is None:
            records.append((0.0, float("nan")))
            return
        weight = zero.full_param(module.sae.W_dec)
        direction = weight / weight.norm(dim=1, keepdim=True)
        grad = grad.float()
        records.append((grad.norm().item(), (grad * direction).sum(1).abs().max().item()))

    module.on_before_optimizer_step = checked
    return records


def seeded_module():
    torch.manual_seed(0)
    return make_module()


def make_resampler() -> DeadLatentResampler:
    return DeadLatentResampler(
        method="anthropic", neuron_resampling_interval=RESAMPLE_EVERY, last_resampling_step=LAST_RESAMPLING
    )


def held_out_activations(datamodule, module) -> torch.Tensor:
    ids = datamodule.corpus.batch(range(datamodule.num_train_contexts, len(datamodule.corpus)))[:, :16]
    acts = datamodule.hooked_llm.harvest(ids)[:, 1:]
    return acts.reshape(-1, acts.shape[-1]).float() * module.activation_scale.float()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    return build_tiny_corpus(tmp_path_factory.mktemp("zero-corpus"), tiny_model_dir)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_overlay__trains_resamples_and_keeps_unit_decoder_under_zero(
    stage, tmp_path, corpus, tiny_model_dir, single_process_group
):
    strategy_args, precision = overlay_trainer_settings()
    strategy_args["stage"] = stage  # the overlay's stage 2, or what `--trainer.strategy.init_args.stage 3` sets
    module = seeded_module()
    untrained = copy.deepcopy(module.sae)
    grads = record_projected_decoder_grads(module)
    snapshots = SnapshotResampledRows(LAST_RESAMPLING, KILLED)
    trainer = make_trainer(
        tmp_path, max_steps=MAX_STEPS, strategy=CpuDeepSpeedStrategy(**strategy_args), precision=precision
    )
    resampler = make_resampler()
    trainer.callbacks += [KillLatents(KILL_AT, KILLED), resampler, snapshots]
    datamodule = make_datamodule(corpus, tiny_model_dir)
    trainer.fit(module, datamodule)

    # The run really was ZeRO at this stage, so zero_access took its DeepSpeed branch.
    assert trainer.strategy.deepspeed_engine.zero_optimization_stage() == stage
    assert zero.zero_stage(module.sae.W_dec) == stage
    assert trainer.precision == precision

    # Gradients were reachable before every optimizer step and lost their component along the decoder rows.
    assert len(grads) == MAX_STEPS
    for grad_norm, parallel in grads:
        assert grad_norm > 0 and parallel < 1e-2 * grad_norm

    # Resampling found the killed latents dead at the last resampling and gave them unit decoder rows, zero
    # encoder bias and zero Adam moments (which they had one step before).
    assert [entry["step"] for entry in resampler.history] == [RESAMPLE_EVERY, LAST_RESAMPLING]
    assert resampler.history[-1]["dead"] >= len(KILLED)
    before, after = snapshots.snapshots[LAST_RESAMPLING - 1], snapshots.snapshots[LAST_RESAMPLING]
    assert torch.all(before["b_enc"] < -1e3) and torch.all(after["b_enc"] == 0)
    torch.testing.assert_close(after["decoder_norms"], torch.ones(len(KILLED)))
    for name in ("W_enc", "W_dec", "b_enc"):
        for key in ADAM_MOMENTS:
            assert before[f"{name}.{key}"].abs().sum() > 0, f"{name}.{key}: nothing to reset"
            assert torch.all(after[f"{name}.{key}"] == 0), f"{name}.{key} not reset"

    # Learning, judged on held-out activations with the fp32 master weights in a plain SparseAutoencoder.
    trained = copy.deepcopy(untrained)
    trained.load_state_dict({name: zero.full_param(p) for name, p in module.sae.named_parameters()})
    x = held_out_activations(datamodule, module)
    with torch.no_grad():
        ev_untrained, ev_trained = (explained_variance(x, sae(x).x_hat).item() for sae in (untrained, trained))
        revived = (trained(x).latents[:, KILLED] > 0).any(0)
    assert ev_trained > 0.5 and ev_trained > ev_untrained + 0.4, (ev_untrained, ev_trained)
    assert revived.float().mean() > 0.9

    # Unit-norm decoder rows in the fp32 master copy, and the working copy the forward reads is that copy.
    master = zero.full_param(module.sae.W_dec)
    torch.testing.assert_close(master.norm(dim=1), torch.ones(256))
    with deepspeed.zero.GatheredParameters([module.sae.W_dec], enabled=stage == 3):
        working = module.sae.W_dec.detach().clone()
    assert torch.equal(working, master.to(working.dtype))


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, corpus, tiny_model_dir) -> dict[str, torch.Tensor]:
    """Parameters and Adam moments after the same run without DeepSpeed: the reference for ZeRO."""
    module = seeded_module()
    trainer = make_trainer(tmp_path_factory.mktemp("single-device"), max_steps=MAX_STEPS)
    trainer.callbacks += [KillLatents(KILL_AT, KILLED), make_resampler()]
    trainer.fit(module, make_datamodule(corpus, tiny_model_dir))
    state = trainer.optimizers[0].state
    result = {}
    for name, param in module.sae.named_parameters():
        result[name] = param.detach().clone()
        result.update({f"{name}.{key}": state[param][key].clone() for key in ADAM_MOMENTS})
    return result


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_fp32__matches_single_device_run_with_resampling_and_decoder_constraint(
    stage, tmp_path, corpus, tiny_model_dir, single_process_group, single_device_run
):
    # fp32, not the overlay's bf16, whose rounding would blur the comparison. With one rank ZeRO must reproduce
    # the single-device run: an edit zero_access misses (a gradient projection, a renormalised master copy, a
    # reset moment) shows up as a difference.
    strategy_args, _ = overlay_trainer_settings()
    strategy = CpuDeepSpeedStrategy(**{**strategy_args, "stage": stage})
    module = seeded_module()
    trainer = make_trainer(tmp_path, max_steps=MAX_STEPS, strategy=strategy, precision="32-true")
    trainer.callbacks += [KillLatents(KILL_AT, KILLED), make_resampler()]
    trainer.fit(module, make_datamodule(corpus, tiny_model_dir))
    for name, param in module.sae.named_parameters():
        expected = single_device_run[name]
        torch.testing.assert_close(zero.full_param(param), expected, msg=name, atol=1e-5, rtol=1e-4)
        for key in ADAM_MOMENTS:
            expected = single_device_run[f"{name}.{key}"]
            moment = safe_get_full_optimizer_state(param, key)
            torch.testing.assert_close(moment, expected, msg=f"{name}.{key}", atol=1e-6, rtol=1e-4)
