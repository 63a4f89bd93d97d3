"""An SAE fit killed with SIGKILL at a seeded random step (``tests.helpers.kill9``), resumed with the same command
from ``last.ckpt`` or from the newest step checkpoint, ends where an uninterrupted run ends: the same weights, buffers
and metrics rows. The run killed is the usual way a long run goes on: a finished 8-step run continued to 16 steps
with ``--ckpt_path last.ckpt``, killed after its step-12 checkpoint."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from neurolight.cli.main import main as neurolight
from tests.helpers.kill9 import kill_9_after_a_second_run_is_refused, kill_batch, write_recipe
from tests.helpers.recipes import SAE_EVERY, SAE_STEPS, sae_recipe
from tests.helpers.sae import build_tiny_corpus

FIRST = 8  # a first run of 8 steps, continued to SAE_STEPS (16); a step checkpoint every SAE_EVERY (4)


def checkpoints(root: Path) -> Path:
    return root / "tiny" / "version_0" / "checkpoints"


STEP_METRICS = ("train/loss", "train/mse", "train/sparsity", "train/aux")
WINDOW_METRICS = ("train/l0", "train/explained_variance", "train/dead_fraction", "train/dense_fraction")


def metric_rows(root: Path) -> dict[int, dict]:
    """Per step: the metrics it computes itself, and the window metrics on the steps that compute them (every
    ``metrics_every_n_steps``). Lightning repeats the newest window values on the rows in between, which a resumed
    process does not have until it computes them again, and writes the resumed rows under the next epoch number."""
    with (root / "tiny" / "version_0" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    steps = [int(row["step"]) for row in rows]
    assert len(set(steps)) == len(steps), f"steps logged twice in {root}: {sorted(steps)}"
    return {
        int(row["step"]): {
            key: row[key] for key in STEP_METRICS + (WINDOW_METRICS if (int(row["step"]) + 1) % 2 == 0 else ())
        }
        for row in rows
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    """The folder of the killed run, its recipe (the resumed runs copy both) and the uninterrupted 16-step run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process (tests.helpers.kill9)
    try:
        tmp = tmp_path_factory.mktemp("sae-kill9")
        corpus = build_tiny_corpus(tmp, tiny_model_dir)
        killed = tmp / "killed"
        config = write_recipe(tmp / "killed.yaml", sae_recipe(killed, corpus, tiny_model_dir))
        neurolight(["fit", "--config", str(config), "--trainer.max_steps", str(FIRST)])
        stop = kill_batch("sae", SAE_EVERY + 1, SAE_STEPS - FIRST)  # after the step-12 checkpoint, before the end
        continued = ["fit", "--config", str(config), "--ckpt_path", str(checkpoints(killed) / "last.ckpt")]
        kill_9_after_a_second_run_is_refused(continued, stop, tmp / "killed.log", checkpoints(killed))
        reference = tmp / "reference"
        config = write_recipe(tmp / "reference.yaml", sae_recipe(reference, corpus, tiny_model_dir))
        neurolight(["fit", "--config", str(config)])
        return {"killed": killed, "corpus": corpus, "reference": reference, "stop": stop, "tmp": tmp}
    finally:
        torch.set_num_threads(threads)


def resume_from(runs: dict, name: str, model_dir: Path, checkpoint: str) -> Path:
    """A copy of the killed run's folder, resumed from ``checkpoint`` with the killed run's command."""
    root = runs["tmp"] / name
    shutil.copytree(runs["killed"], root)
    config = write_recipe(runs["tmp"] / f"{name}.yaml", sae_recipe(root, runs["corpus"], model_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        neurolight(["fit", "--config", str(config), "--ckpt_path", str(checkpoints(root) / checkpoint)])
    finally:
        torch.set_num_threads(threads)
    return root


def assert_same_end(root: Path, runs: dict) -> None:
    got = torch.load(checkpoints(root) / "last.ckpt", weights_only=False)
    want = torch.load(checkpoints(runs["reference"]) / "last.ckpt", weights_only=False)
    assert got["global_step"] == want["global_step"] == SAE_STEPS
    different = [name for name, value in want["state_dict"].items() if not value.equal(got["state_dict"][name])]
    assert not different, f"killed before batch {runs['stop']} of the continued run: {different} differ"
    assert metric_rows(root) == metric_rows(runs["reference"])


def test_kill_9__the_killed_run_left_whole_checkpoints_up_to_its_last_step_checkpoint(runs):
    names = sorted(p.name for p in checkpoints(runs["killed"]).iterdir() if p.suffix == ".ckpt")
    assert names == ["last.ckpt", "step_0000004.ckpt", "step_0000008.ckpt", "step_0000012.ckpt"]
    assert torch.load(checkpoints(runs["killed"]) / "last.ckpt", weights_only=False)["global_step"] == FIRST
    assert not [p.name for p in checkpoints(runs["killed"]).iterdir() if p.name.endswith(".tmp")]


def test_kill_9__resume_from_last_ckpt_ends_like_an_uninterrupted_run(runs, tiny_model_dir):
    assert_same_end(resume_from(runs, "from-last", tiny_model_dir, "last.ckpt"), runs)


def test_kill_9__resume_from_the_newest_step_checkpoint_ends_like_an_uninterrupted_run(runs, tiny_model_dir):
    assert_same_end(resume_from(runs, "from-step", tiny_model_dir, "step_0000012.ckpt"), runs)
