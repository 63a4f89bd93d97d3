"""A SEND fit killed with SIGKILL at a seeded random batch (``tests.helpers.kill9``) and resumed with the same
command plus ``--ckpt_path .../last.ckpt`` ends in the weights of an uninterrupted run, bit for bit, with each step's
metrics once; while the killed run was alive, a second run on its folder was refused in one line naming it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from safetensors.torch import load_file

from neurolight.cli.main import main as neurolight
from tests.helpers.kill9 import kill_9_after_a_second_run_is_refused, kill_batch, write_recipe
from tests.helpers.recipes import SEND_BATCHES, SEND_EPOCHS, send_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as in the killed process


def metric_rows(root: Path) -> list[dict]:
    with (root / "tiny" / "version_0" / "metrics.csv").open(newline="") as file:
        return sorted(csv.DictReader(file), key=lambda row: (int(row["step"]), row.get("val/loss", "")))


def test_kill_9__resume_from_last_ckpt_gives_the_weights_and_metrics_of_an_uninterrupted_run(
    tiny_model_dir, records_path, tmp_path
):
    stop = kill_batch("send", SEND_BATCHES + 1, SEND_EPOCHS * SEND_BATCHES)  # after the first epoch's last.ckpt
    config = write_recipe(tmp_path / "killed.yaml", send_recipe(tmp_path / "killed", tiny_model_dir, records_path))
    checkpoints = tmp_path / "killed" / "tiny" / "version_0" / "checkpoints"
    kill_9_after_a_second_run_is_refused(["fit", "--config", str(config)], stop, tmp_path / "killed.log", checkpoints)
    assert sorted(p.name for p in checkpoints.iterdir()) == [".neurolight.lock", "last.ckpt"], f"batch {stop}"
    assert not (tmp_path / "killed" / "model" / "send").exists()

    neurolight(["fit", "--config", str(config), "--ckpt_path", str(checkpoints / "last.ckpt")])
    reference = send_recipe(tmp_path / "reference", tiny_model_dir, records_path)
    neurolight(["fit", "--config", str(write_recipe(tmp_path / "reference.yaml", reference))])

    resumed = load_file(tmp_path / "killed" / "model" / "send" / "model.safetensors")
    straight = load_file(tmp_path / "reference" / "model" / "send" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    different = [name for name, value in straight.items() if not value.equal(resumed[name])]
    assert not different, f"killed before batch {stop}: {different}"
    assert metric_rows(tmp_path / "killed") == metric_rows(tmp_path / "reference"), f"killed before batch {stop}"
