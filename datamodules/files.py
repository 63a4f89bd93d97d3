"""Writing files so that a crash or a full disk never leaves a partial file under a real name: every writer in
neurolight writes to a hidden temporary name in the target's folder (same filesystem), then renames."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any failure it is removed.

    A full disk or a read-only folder surfaces as one OSError that names the file and the fix.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        _remove(temporary)
        raise OSError(
            f"could not write the {what} {path} ({error.strerror or error}); free space on, or fix the "
            f"permissions of, {path.parent} and run again"
        ) from error
    except BaseException:
        _remove(temporary)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
