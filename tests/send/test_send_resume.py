"""A SEND fit that crashes leaves a checkpoint: ResumableCheckpoint writes last.ckpt at every epoch end (resuming
from it is bit-identical through a drop window) and mid_epoch.ckpt when the run stops; every recipe uses it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from neurolight.callbacks import ResumableCheckpoint, SensitiveNeuronDropout
from tests.helpers.send import fit, make_datamodule, make_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RECIPES = sorted((Path(__file__).parents[2] / "configs" / "send").glob("*.yaml"))


class Crash(pl.Callback):
    """Stands for a crash: raises at one (epoch, batch)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            raise RuntimeError("simulated crash")


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".neurolight.lock")


def _send():
    return SensitiveNeuronDropout(
        sensitivity_threshold=0.25, identify_every_n_epochs=1, drop_epochs=2, log_eigenscore=False
    )


def test_crash_in_epoch_2__resumes_from_last_ckpt_to_the_weights_of_an_uninterrupted_run(
    tiny_model_dir, records_path, tmp_path, caplog
):
    straight_module = make_module(tiny_model_dir, tmp_path)
    straight = _send()
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        fit(straight_module, make_datamodule(tiny_model_dir, records_path), tmp_path / "a", [straight], 3)
    # The console says what was chosen (it was only in the metrics before).
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SEND: after epoch")]
    assert len(chosen) == len(straight.selections) >= 1
    assert chosen[0].startswith(f"SEND: after epoch {straight.selections[0]['epoch']}, ")
    assert f" {len(straight.selections[0]['indices'])} of 64 neurons chosen as the sensitive ones to drop" in chosen[0]

    folder = tmp_path / "b" / "checkpoints"
    crashed = make_module(tiny_model_dir, tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, make_datamodule(tiny_model_dir, records_path), tmp_path / "b", [_send(), Crash(2, 1)], 3,
            checkpoint=ResumableCheckpoint(dirpath=str(folder)))  # fmt: skip
    assert _files(folder) == ["last.ckpt", "mid_epoch.ckpt"]  # no temporary file left
    assert torch.load(folder / "last.ckpt", weights_only=False)["epoch"] == 1  # the end of epoch 2 (0-based 1)

    resumed_module = make_module(tiny_model_dir, tmp_path)
    resumed = _send()
    fit(resumed_module, make_datamodule(tiny_model_dir, records_path), tmp_path / "b", [resumed], 3,
        ckpt_path=str(folder / "last.ckpt"), checkpoint=ResumableCheckpoint(dirpath=str(folder)))  # fmt: skip
    assert resumed.selections == straight.selections and torch.equal(resumed.sensitive, straight.sensitive)
    for (name, a), b in zip(straight_module.model.state_dict().items(), resumed_module.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert _files(folder) == ["last.ckpt"]  # the finished epoch replaced mid_epoch.ckpt


def test_every_n_train_steps__writes_mid_epoch_checkpoints(tiny_model_dir, records_path, tmp_path):
    folder = tmp_path / "checkpoints"
    saved_steps = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if (folder / "mid_epoch.ckpt").is_file():
                saved_steps.append(torch.load(folder / "mid_epoch.ckpt", weights_only=False)["global_step"])

    checkpoint = ResumableCheckpoint(dirpath=str(folder), every_n_train_steps=2)
    fit(make_module(tiny_model_dir, tmp_path), make_datamodule(tiny_model_dir, records_path), tmp_path, [Watch()], 1,
        checkpoint=checkpoint)  # fmt: skip
    assert saved_steps and all(step % 2 == 0 for step in saved_steps)
    assert (folder / "last.ckpt").is_file() and not (folder / "mid_epoch.ckpt").exists()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_send_recipes__fit_with_a_resumable_checkpoint(recipe):
    config = yaml.safe_load(recipe.read_text())
    if "trainer" not in config or "callbacks" not in config["trainer"]:
        pytest.skip(f"{recipe.name} is not a fit recipe")
    paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "neurolight.callbacks.ResumableCheckpoint" in paths or "QAPredictionWriter" in " ".join(paths)


def test_csv_logger__a_resumed_run_keeps_the_history_and_logs_each_step_once(tiny_model_dir, records_path, tmp_path):
    import csv

    from neurolight.callbacks import ResumableCSVLogger

    def steps(folder) -> list[int]:
        with open(folder / "metrics.csv", newline="") as file:
            return sorted(int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss"))

    def logger(root):
        return ResumableCSVLogger(save_dir=str(root), name="run", version=0)

    straight = make_module(tiny_model_dir, tmp_path)
    fit(straight, make_datamodule(tiny_model_dir, records_path), tmp_path / "a", [], 3, logger=logger(tmp_path / "a"),
        log_every_n_steps=1)  # fmt: skip
    expected = steps(tmp_path / "a" / "run" / "version_0")

    folder = tmp_path / "b" / "checkpoints"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(make_module(tiny_model_dir, tmp_path), make_datamodule(tiny_model_dir, records_path), tmp_path / "b",
            [Crash(2, 2)], 3, checkpoint=ResumableCheckpoint(dirpath=str(folder), save_on_exception=False),
            logger=logger(tmp_path / "b"), log_every_n_steps=1)  # fmt: skip
    fit(make_module(tiny_model_dir, tmp_path), make_datamodule(tiny_model_dir, records_path), tmp_path / "b", [], 3,
        ckpt_path=str(folder / "last.ckpt"), checkpoint=ResumableCheckpoint(dirpath=str(folder)),
        logger=logger(tmp_path / "b"), log_every_n_steps=1)  # fmt: skip
    assert steps(tmp_path / "b" / "run" / "version_0") == expected and len(expected) > 6


class Preempt(pl.Callback):
    """Stands for a SIGTERM (or the CLI's first Ctrl-C): Lightning stops at the end of the current step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True


def test_sigterm__stops_between_steps_and_leaves_a_checkpoint_of_that_step(tiny_model_dir, records_path, tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    folder = tmp_path / "checkpoints"
    with pytest.raises(SIGTERMException):
        fit(make_module(tiny_model_dir, tmp_path), make_datamodule(tiny_model_dir, records_path), tmp_path,
            [Preempt(step=4)], 3, checkpoint=ResumableCheckpoint(dirpath=str(folder)))  # fmt: skip
    assert torch.load(folder / "mid_epoch.ckpt", weights_only=False)["global_step"] == 5


def test_cli_ctrl_c__the_first_one_asks_lightning_to_stop_after_the_step_the_second_interrupts(tmp_path):
    import os
    import signal

    from neurolight.cli.main import _stop_between_steps_on_ctrl_c

    previous = signal.getsignal(signal.SIGINT)
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path)
    try:
        _stop_between_steps_on_ctrl_c(trainer)
        os.kill(os.getpid(), signal.SIGINT)
        assert trainer.received_sigterm
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
