"""A process that imports neurolight destroys its default process group at exit, so a gloo rank does not abort
(SIGABRT, "terminate called without an active exception") after its work is done (neurolight/_process_exit.py)."""

from __future__ import annotations

import subprocess
import sys

import torch

import neurolight  # noqa: F401  (registers the teardown in this module's spawned ranks too)
from tests.helpers.gloo import free_port

# Registered before neurolight is imported, so it runs after neurolight's handler (atexit runs last-in, first-out).
_CHILD = """
import atexit, torch
atexit.register(lambda: print("initialized at exit:", torch.distributed.is_initialized()))
import neurolight
torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
print("initialized:", torch.distributed.is_initialized())
"""


def test_importing_neurolight__destroys_the_default_group_before_the_interpreter_finalizes() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD.format(port=free_port())], capture_output=True, text=True, check=True
    )
    assert done.stdout.split("\n")[:2] == ["initialized: True", "initialized at exit: False"]


def _gather_and_return(rank: int, port: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for _ in range(3):
        parts = [torch.empty(1000) for _ in range(2)]
        torch.distributed.all_gather(parts, torch.randn(1000))
    # returns with the group alive, as Lightning's spawned ranks do


def test_spawned_gloo_ranks__exit_cleanly_right_after_their_last_all_gather() -> None:
    # Without the teardown about one round in three aborted (SIGABRT) on a 2-core machine; six rounds catch that
    # with probability 0.88, and any abort fails the test.
    for _ in range(6):
        torch.multiprocessing.start_processes(_gather_and_return, (free_port(),), nprocs=2, start_method="spawn")
