"""Destroys the default process group before the interpreter finalizes, whatever its backend.

Lightning registers this teardown for NCCL only. A gloo group left alive at exit makes a rank abort now and then
after its work is done ("terminate called without an active exception", SIGABRT): a gloo worker thread may still
hold the last reference to a finished collective's ``Work`` when the main thread returns; dropping it releases
tensors owned by Python, which needs the GIL, and a thread asking for the GIL during finalization is ended by
``pthread_exit`` inside a ``noexcept`` destructor, which calls ``std::terminate``. Destroying the group in an
``atexit`` handler, while the interpreter is still whole, joins those threads first.

Imported by ``neurolight/__init__.py``, so every process that unpickles a neurolight object (a spawned DDP rank)
registers it."""

from __future__ import annotations

import atexit

import torch


def _destroy_default_process_group() -> None:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


atexit.register(_destroy_default_process_group)
