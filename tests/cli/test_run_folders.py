"""Runs never overwrite each other: a live run holds its folder (refused in one line naming the holder, released
even by kill -9), a fresh fit refuses a folder with another run's checkpoints, and every logger gets its own
checkpoint folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from neurolight.callbacks.run_folder import FolderInUseError, FolderLock, refuse_other_runs_checkpoints, run_directory

HOLD = """
import sys, time
from neurolight.callbacks.run_folder import FolderLock
lock = FolderLock(sys.argv[1], "a test run").acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_lock__a_second_holder_is_refused_with_the_first_ones_process(tmp_path):
    first = FolderLock(tmp_path / "run", "neurolight fit").acquire()
    with pytest.raises(FolderInUseError, match=rf"in use by process {os.getpid()} on .*neurolight fit"):
        FolderLock(tmp_path / "run", "neurolight fit").acquire()
    first.release()
    FolderLock(tmp_path / "run", "neurolight fit").acquire().release()


def test_lock__kill_9_of_the_holder_frees_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=rf"process {holder.pid} .*a test run"):
            FolderLock(tmp_path, "second").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            FolderLock(tmp_path, "after the kill").acquire().release()
            break
        except FolderInUseError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_fresh_fit__refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"x")
    with pytest.raises(
        FileExistsError, match=r"already holds checkpoints of an earlier run \(last.ckpt\).*--ckpt_path"
    ):
        refuse_other_runs_checkpoints(tmp_path, SimpleNamespace(ckpt_path=None))
    refuse_other_runs_checkpoints(tmp_path, SimpleNamespace(ckpt_path=str(tmp_path / "last.ckpt")))  # a resume


def test_run_directory__every_logger_run_gets_its_own_folder(tmp_path):
    def trainer(name, version):
        logger = SimpleNamespace(save_dir=str(tmp_path), name=name, version=version)
        strategy = SimpleNamespace(broadcast=lambda value: value)
        return SimpleNamespace(loggers=[logger], default_root_dir=str(tmp_path / "root"), strategy=strategy)

    # A W&B run id, CSV versions: never the bare save_dir that trainer.log_dir gives for W&B.
    assert run_directory(trainer("project", "abc123")) == tmp_path / "project" / "abc123"
    assert run_directory(trainer("demo", 0)) == tmp_path / "demo" / "version_0"
    assert run_directory(trainer("demo", 1)) != run_directory(trainer("demo", 0))


def test_resume__a_logger_without_a_version_continues_in_the_checkpoints_version_folder(tmp_path):
    from jsonargparse import Namespace

    from neurolight.cli.main import resume_into_the_checkpoints_version

    def trainer(version=None):
        init = Namespace(save_dir=str(tmp_path / "runs"), name="smollm2-135m_fanoutqa", version=version)
        return Namespace(logger=Namespace(class_path="neurolight.callbacks.ResumableCSVLogger", init_args=init))

    checkpoint = tmp_path / "runs" / "smollm2-135m_fanoutqa" / "version_3" / "checkpoints" / "last.ckpt"
    config = trainer()
    resume_into_the_checkpoints_version(str(checkpoint), config)
    assert config.logger.init_args.version == 3  # not a new version_4 beside it
    config = trainer(version=7)
    resume_into_the_checkpoints_version(str(checkpoint), config)
    assert config.logger.init_args.version == 7  # a version given stays
    config = trainer()
    resume_into_the_checkpoints_version(str(tmp_path / "elsewhere" / "last.ckpt"), config)
    assert config.logger.init_args.version is None  # a checkpoint from another folder: a new version
