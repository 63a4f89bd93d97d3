"""CPU process groups (gloo) for tests: a free loopback port and a function run on each rank of a group."""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch


def free_port() -> int:
    """A loopback port free at the time of asking (for MASTER_PORT or a tcp:// rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_on_ranks(worker: Callable, *args, world_size: int = 2, start_method: str = "spawn") -> None:
    """``worker(rank, *args)`` on ``world_size`` processes joined in a gloo group; returns when all have ended and
    raises what one raised. Spawned by default: a fork of a test process that earlier tests left with threads can
    deadlock (and fork is refused once CUDA started)."""
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    torch.multiprocessing.start_processes(
        _in_group, (worker, world_size, rendezvous, args), nprocs=world_size, start_method=start_method
    )


def _in_group(rank: int, worker: Callable, world_size: int, rendezvous: str, args: tuple) -> None:
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size)
    try:
        worker(rank, *args)
    finally:
        torch.distributed.destroy_process_group()
