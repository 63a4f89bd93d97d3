"""Batches read ahead in a background thread, so the next batch is ready when the training step asks for it.

A stream that reads from disk in the training loop's thread adds its read time to every step. On a GPU the SAE step
of a cached stream takes a millisecond or two and the read of a 4096-row batch several (docs/sae.md, Activation
cache: reading ahead); in a thread the reads overlap the steps. numpy's copies out of memory maps and its gathers
release the GIL, so one thread suffices and, unlike DataLoader worker processes, shares the memory maps and the data
module's state instead of pickling them.

The thread is always stopped: by ``close()``, when the iterator is garbage-collected, or by the data module's
``teardown``; it is a daemon, so it can never keep the interpreter alive.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_ITEM, _END, _ERROR = range(3)
_POLL_S = 0.05  # how often a producer blocked on a full queue looks whether it was told to stop


class Prefetcher(Iterator):
    """Iterate ``source`` in a background thread, ``depth`` items ahead, in the same order.

    ``transform`` (e.g. pinning the batch's memory for an asynchronous copy to the GPU) runs in the thread too. An
    exception raised by ``source`` or ``transform`` is raised again by ``__next__``, with its traceback.
    """

    def __init__(self, source: Iterator, depth: int, transform: Callable[[Any], Any] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth}: a prefetcher reads at least one item ahead")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # The thread gets the queue and the event, not self: holding self would keep the prefetcher alive (and its
        # thread running) after the consumer dropped it.
        self._thread = threading.Thread(
            target=_produce, args=(source, transform, self._queue, self._stop), name="neurolight-prefetch", daemon=True
        )
        self._thread.start()

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self.close()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread and wait for it (at most the read it is in); idempotent."""
        self._done = True
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def alive(self) -> bool:
        """Whether the reading thread still runs."""
        return self._thread.is_alive()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when __init__ failed
        if stop is not None:
            self.close()


def _produce(source: Iterator, transform, out: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in source:
            if not _put(out, stop, (_ITEM, item if transform is None else transform(item))):
                return
        _put(out, stop, (_END, None))
    except BaseException as error:  # handed to the consumer, raised there
        _put(out, stop, (_ERROR, error))
    finally:
        close = getattr(source, "close", None)  # a generator: run its finally blocks here, in its own thread
        if close is not None:
            close()


def _put(out: queue.Queue, stop: threading.Event, entry: tuple) -> bool:
    """Put ``entry`` once there is room; False when told to stop first."""
    while not stop.is_set():
        try:
            out.put(entry, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False
