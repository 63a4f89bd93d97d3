"""Killing real ``neurolight`` runs with SIGKILL at a chosen batch, for the kill -9 tests.

A recipe written by a test lists ``tests.helpers.kill9.StopBeforeBatch`` among its callbacks. In a process started
by ``start_until_stopped`` the callback stops the process (SIGSTOP) just before its N-th training or prediction batch,
with everything before that batch done (checkpoints, snapshots, stored batches); the test then checks the folder the
stopped run holds and kills it with SIGKILL, which no handler sees: nothing is flushed or saved on the way out. In any
other process (the uninterrupted reference, the resumed run) the callback does nothing.

The batch is drawn from a seeded generator (``kill_batch``): ``NEUROLIGHT_KILL9_SEED`` chooses other batches, so a
loop over seeds turns the tests into a small soak.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

STOP_ENV = "NEUROLIGHT_TEST_STOP_BEFORE_BATCH"
SEED_ENV = "NEUROLIGHT_KILL9_SEED"
ROOT = Path(__file__).parents[2]
STOPPER = {"class_path": "tests.helpers.kill9.StopBeforeBatch"}
"""The callback entry to add to a recipe's ``trainer.callbacks``."""


class StopBeforeBatch(pl.Callback):
    """Stops this process (SIGSTOP) just before its ``$NEUROLIGHT_TEST_STOP_BEFORE_BATCH``-th training or prediction
    batch (1-based, counted over the process); nothing without the variable. It holds no state, so checkpoints of
    runs with and without it are the same."""

    def __init__(self) -> None:
        self.stop_before = int(os.environ.get(STOP_ENV, "0"))
        self.started = 0

    def _batch_starts(self) -> None:
        self.started += 1
        if self.started == self.stop_before:
            os.kill(os.getpid(), signal.SIGSTOP)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_starts()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_starts()


def kill_batch(job: str, low: int, high: int) -> int:
    """A batch in ``[low, high]`` drawn for ``job`` from ``$NEUROLIGHT_KILL9_SEED`` (default 0)."""
    return random.Random(f"{os.environ.get(SEED_ENV, '0')}:{job}").randint(low, high)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def start_until_stopped(
    args: list[str], stop_before: int, log: Path, timeout_s: float = 180, module: str = "neurolight"
) -> subprocess.Popen:
    """Starts ``python -m neurolight *args`` (``module`` instead of ``neurolight``: another command) and returns it
    once it has stopped before batch ``stop_before``.

    One torch thread, as in the tests' own runs, so the arithmetic (and so the weights) is the same in both.
    """
    env = {**os.environ, STOP_ENV: str(stop_before), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
        )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status = os.waitpid(process.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return process
        if pid:  # it ended (and is reaped): it never reached that batch
            process.returncode = os.waitstatus_to_exitcode(status)
            raise AssertionError(
                f"neurolight {' '.join(args)} ended with {process.returncode} before batch {stop_before}:\n"
                + _tail(log)
            )
        if time.monotonic() > deadline:
            kill9(process)
            raise AssertionError(f"neurolight {' '.join(args)} did not reach batch {stop_before} in {timeout_s} s")
        time.sleep(0.05)


def kill_9_after_a_second_run_is_refused(
    args: list[str], stop_before: int, log: Path, held: Path, module: str = "neurolight", command=None
) -> None:
    """Runs ``neurolight *args`` up to batch ``stop_before``; while it is stopped there, the same command run again
    here must be refused in one line that names the folder ``held`` and the stopped run's process; then kills the
    stopped run with SIGKILL. Another command: ``module`` to run with ``python -m`` and its ``main`` here."""
    from neurolight.cli.main import main as neurolight

    run = start_until_stopped(args, stop_before, log, module=module)
    try:
        with pytest.raises(SystemExit) as refused:
            (command or neurolight)(args)
        message = str(refused.value.code)
        assert "\n" not in message and f"{held} is in use by process {run.pid} on " in message, message
    finally:
        kill9(run)


def kill9(process: subprocess.Popen) -> None:
    """SIGKILL (also ends a stopped process) and reap it."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def fit_killed_and_resumed(recipe_at: Callable[[Path], dict], job: str, tmp_path: Path, low: int, high: int):
    """An SAE fit of ``recipe_at(folder)`` run uninterrupted (``tmp_path/reference``) and run again
    (``tmp_path/killed``), killed with SIGKILL before a batch drawn in ``[low, high]`` for ``job``, then resumed with
    the same command from its newest step checkpoint. Returns the two runs' ``last.ckpt`` contents (resumed,
    reference) and what the failure message should name: the batch and the checkpoint resumed from."""
    import torch

    from neurolight.cli.main import main as neurolight

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    neurolight(["fit", "--config", str(write_recipe(tmp_path / "reference.yaml", recipe_at(reference)))])
    config = write_recipe(tmp_path / "killed.yaml", recipe_at(killed))
    stop = kill_batch(job, low, high)
    folder = killed / "tiny" / "version_0" / "checkpoints"
    kill_9_after_a_second_run_is_refused(["fit", "--config", str(config)], stop, tmp_path / "killed.log", folder)
    newest = max(folder.glob("step_*.ckpt"))
    neurolight(["fit", "--config", str(config), "--ckpt_path", str(newest)])
    last = [torch.load(root / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
            for root in (killed, reference)]  # fmt: skip
    return last[0], last[1], f"killed before batch {stop}, resumed from {newest.name}"
