"""Each run writes into its own folder, and holds it while it runs.

``run_directory`` places a run's files as Lightning's ``ModelCheckpoint`` does, with any logger:
``<save_dir>/<name>/<version>`` (a W&B run id, a CSV ``version_N``), so two runs never share a checkpoint folder
(``trainer.log_dir`` is the bare ``save_dir`` for loggers other than CSV and TensorBoard).

``FolderLock`` is an advisory ``flock`` on ``<folder>/.neurolight.lock``: the operating system drops it when the
process ends, even on ``kill -9``, so a stale lock never blocks a rerun; a second live run on the same folder is
refused in one line that names the holder's process and command.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

LOCK_FILE = ".neurolight.lock"


class FolderInUseError(RuntimeError):
    """Another live process holds the folder."""


def run_directory(trainer) -> Path:
    """``<save_dir>/<name>/<version>`` of the first logger, else ``default_root_dir`` (the same on every rank)."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        folder = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    else:
        folder = trainer.default_root_dir
    return Path(trainer.strategy.broadcast(folder))


class FolderLock:
    """Hold ``folder`` for this process: ``acquire()`` raises ``FolderInUseError`` if a live process holds it."""

    def __init__(self, folder: str | Path, purpose: str) -> None:
        self.folder = Path(folder)
        self.purpose = purpose
        self._file = None

    def acquire(self) -> FolderLock:
        if self._file is not None:
            return self
        path = self.folder / LOCK_FILE
        try:  # also proves, before any expensive step, that the run can write its output here
            self.folder.mkdir(parents=True, exist_ok=True)
            file = open(path, "a+")  # held open for the life of the lock
        except OSError as error:
            raise OSError(
                f"cannot write to {self.folder} ({error.strerror or error}); choose a writable location for the "
                f"{self.purpose} output"
            ) from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = _describe(file.read())
            file.close()
            raise FolderInUseError(
                f"{self.folder} is in use by {holder}; wait for that run to end, stop it, or give this run "
                "another folder (another logger version or output path)"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
            "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }))  # fmt: skip
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


class FolderHolder:
    """Mixin for callbacks that hold their output folder for the run: ``hold`` it in ``setup``; it is released
    at teardown and when the run stops on an exception."""

    _lock: FolderLock | None = None

    def hold(self, folder: str | Path, purpose: str) -> None:
        self.release_folder()
        self._lock = FolderLock(folder, purpose).acquire()

    def release_folder(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.release_folder()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.release_folder()


def refuse_other_runs_checkpoints(folder: Path, trainer) -> None:
    """A fresh fit (no ``--ckpt_path``) must not overwrite the checkpoints another run left in ``folder``."""
    if trainer.ckpt_path is not None or not folder.is_dir():
        return
    found = sorted(p.name for p in folder.iterdir() if p.suffix == ".ckpt")
    if found:
        raise FileExistsError(
            f"{folder} already holds checkpoints of an earlier run ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}); resume it with --ckpt_path {folder / found[-1]}, give this run "
            "its own folder (another logger version, or dirpath), or delete the folder"
        )


def save_checkpoint_atomically(trainer, path: Path, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` under a temporary name that rank zero chooses for every rank (DeepSpeed fills
    one folder from all ranks), renamed into place by rank zero: a crash or a full disk never leaves a truncated
    checkpoint under ``path``. Collective: every rank calls it."""
    temporary = Path(trainer.strategy.broadcast(str(path.with_name(f".{path.name}.{os.getpid()}.tmp"))))
    try:
        trainer.save_checkpoint(temporary, weights_only=weights_only)  # ends with a barrier of all ranks
        if trainer.is_global_zero:
            _replace(temporary, path)
    except OSError as error:  # a full disk names the temporary file (and fsspec's in /tmp): name this one
        raise OSError(
            f"could not write the checkpoint {path} ({error.strerror or error}); free space on, or fix the "
            f"permissions of, {path.parent} (and the temporary folder, {tempfile.gettempdir()}) and resume from "
            "the last checkpoint written"
        ) from error
    finally:
        if trainer.is_global_zero:
            _remove(temporary)
    trainer.strategy.barrier("save_checkpoint_atomically")


def _replace(source: Path, target: Path) -> None:
    """Atomic for files; a DeepSpeed checkpoint is a folder, which goes into place by two renames."""
    if source.is_dir():
        old = target.with_name(f".{target.name}.old")
        _remove(old)
        if target.exists():
            target.rename(old)
        source.rename(target)
        _remove(old)
    else:
        os.replace(source, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return (
            f"process {holder['pid']} on {holder['host']} ({holder['purpose']}, since {holder['since']}: "
            f"{holder['command']})"
        )
    except (ValueError, KeyError, TypeError):
        return "another process"
