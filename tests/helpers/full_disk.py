"""A real full disk for tests: a small tmpfs mounted for the test (root only, as in CI; otherwise the test is
skipped and says why), filled up front or, by ``FillDisk`` in a recipe, at a chosen batch of a run."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest

FILLER = ".filler"


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mounts a ``size_bytes`` tmpfs at ``path`` (created) and unmounts it on exit."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk tests mount a small tmpfs, which needs root (CI runs the tests as root)")
    path.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "neurolight-full-disk", str(path)]
    try:
        mounted = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"cannot run mount for the full-disk tests: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk tests ({' '.join(command)}): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # a file still open: detach it


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(path: Path, leave: int = 0) -> None:
    """Writes ``path/.filler`` until at most ``leave`` bytes of the file system are free."""
    chunk = b"\0" * (1 << 20)
    with open(path / FILLER, "ab") as file:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while (left := free_bytes(path) - leave) > 0:
                file.write(chunk[:left])
                file.flush()


def files(folder: Path) -> list[str]:
    """Every file under ``folder``, relative, but the filler and run-folder locks."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (FILLER, ".neurolight.lock")
    )


class FillDisk(pl.Callback):
    """Fills the file system of ``folder`` just before the ``before_batch``-th training or prediction batch (1-based,
    counted over the run): the disk is full from then on."""

    def __init__(self, folder: str, before_batch: int) -> None:
        self.folder, self.before_batch, self.started = Path(folder), before_batch, 0

    def _batch_starts(self) -> None:
        self.started += 1
        if self.started == self.before_batch:
            fill(self.folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_starts()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_starts()
