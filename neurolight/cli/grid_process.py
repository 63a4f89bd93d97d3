"""One child process of ``neurolight-send-grid``: run with stdin closed, its output kept in a log file."""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path


def execute(command: list[str], log_path: Path, timeout_s: float | None, quiet: bool) -> tuple[int | None, float]:
    """Run ``command`` with stdin closed, its output to ``log_path`` (and the console unless ``quiet``).

    Returns (exit code, or None after a timeout; wall seconds). Ctrl-C stops the child and propagates.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log_path.open("wb") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            process.kill()

        timer = threading.Timer(timeout_s, stop) if timeout_s else None
        if timer:
            timer.start()
        try:
            for chunk in iter(lambda: process.stdout.read1(1 << 16), b""):
                log.write(chunk)
                if not quiet:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            code = process.wait()
        except KeyboardInterrupt:
            process.kill()
            process.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    return (None if timed_out.is_set() else code), time.monotonic() - start


def tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join(line for line in text[-lines:])
