"""``python -m tests.helpers.harvest_stop ARGS``: ``neurolight-harvest ARGS`` that stops itself (SIGSTOP) at its
``$NEUROLIGHT_TEST_STOP_BEFORE_BATCH``-th file write (1-based), with the file complete under its temporary name but
not yet renamed: the writes are the manifest, then per shard its token ids, each site's rows and the manifest again.
For the kill -9 test of the harvest (``tests.helpers.kill9.start_until_stopped`` waits for the stop)."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

from neurolight.cli.harvest import main
from neurolight.datamodules.sae import activation_cache
from tests.helpers.kill9 import STOP_ENV


def _stopping_before_rename(count: int, atomic_path):
    writes = 0

    @contextmanager
    def stopping(path, what: str = "file"):
        nonlocal writes
        with atomic_path(path, what) as temporary:
            yield temporary
            writes += 1
            if writes == count:
                os.kill(os.getpid(), signal.SIGSTOP)

    return stopping


if __name__ == "__main__":
    activation_cache.atomic_path = _stopping_before_rename(int(os.environ[STOP_ENV]), activation_cache.atomic_path)
    main(sys.argv[1:])
