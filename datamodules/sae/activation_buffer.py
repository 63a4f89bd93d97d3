"""A mixing store of activations: serve a random half, refill the freed slots, repeat.

Activations of consecutive tokens are strongly correlated; SAE training wants i.i.d. batches. The buffer holds
``capacity`` rows; each cycle it draws a random permutation, serves the rows of its first half in batches, then
writes fresh activations into exactly those slots. Every harvested row is served exactly once (the rows kept
for later cycles are served later), and rows that overflow a refill wait in ``pending``: nothing computed is
ever thrown away (docs/sae.md, Activation buffer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class ActivationBuffer:
    """Args:
    capacity: rows held at once (``num_batches_preload * batch_size``).
    batch_size: rows per served batch.
    produce: returns the next chunk of fresh activations, (n, d_in); called as often as needed.
    seed: seed of the buffer's own generator (its state is checkpointed).
    """

    def __init__(
        self,
        capacity: int,
        batch_size: int,
        produce: Callable[[], Tensor],
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 2 * batch_size:
            raise ValueError(
                f"buffer capacity {capacity} must hold at least two batches of {batch_size} (num_batches_preload >= 2)"
            )
        self.capacity = capacity
        self.batch_size = batch_size
        self.produce = produce
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.storage: Tensor | None = None
        self.pending: Tensor | None = None
        # Slots of the current cycle in serving order; slots[:cursor] have been served and are free.
        self.slots = torch.arange(capacity)
        # ``slots`` on the buffer's device, copied once per cycle: copying each batch's indices from pageable host
        # memory would synchronise the CUDA stream at every step.
        self._slots_on_device: Tensor | None = None
        self.cursor = capacity  # everything is free: the first call fills the whole buffer
        # Serve half the buffer per cycle, rounded down to whole batches (at least one batch).
        self.serve_per_cycle = max(batch_size, (capacity // 2) // batch_size * batch_size)

    def _take_fresh(self, n: int) -> Tensor:
        chunks, have = [], 0
        while have < n:
            if self.pending is not None and len(self.pending):
                chunk, self.pending = self.pending, None
            else:
                chunk = self.produce().to(self.device, self.dtype)
            if chunk.ndim != 2:
                raise ValueError(f"produce() must return (n, d_in) activations, got shape {tuple(chunk.shape)}")
            chunks.append(chunk[: n - have])
            if len(chunk) > n - have:
                self.pending = chunk[n - have :]
            have += len(chunks[-1])
        return torch.cat(chunks)

    def fill(self) -> None:
        """Write fresh activations into every free slot and start a new shuffled cycle."""
        free = self.slots[: self.cursor]
        fresh = self._take_fresh(len(free))
        if self.storage is None:
            self.storage = torch.empty(self.capacity, fresh.shape[1], device=self.device, dtype=self.dtype)
        self.storage[free.to(self.device)] = fresh
        self.slots = torch.randperm(self.capacity, generator=self.generator)
        self._slots_on_device = None
        self.cursor = 0

    @property
    def filled(self) -> bool:
        return self.storage is not None and self.cursor < self.serve_per_cycle

    def next_batch(self) -> Tensor:
        """(batch_size, d_in) activations, uniformly mixed over the buffer."""
        if self.cursor >= self.serve_per_cycle:
            self.fill()
        if self._slots_on_device is None:
            self._slots_on_device = self.slots.to(self.device)
        index = self._slots_on_device[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.storage[index]

    def peek(self) -> Tensor:
        """All rows currently held (fills the buffer first if needed); for estimating statistics."""
        if self.storage is None or self.cursor >= self.serve_per_cycle:
            self.fill()
        return self.storage

    def state_dict(self, include_storage: bool = True) -> dict:
        state = {
            "generator": self.generator.get_state(),
            "slots": self.slots.clone(),
            "cursor": self.cursor,
        }
        if include_storage:
            state["storage"] = None if self.storage is None else self.storage.cpu().clone()
            state["pending"] = None if self.pending is None else self.pending.cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._slots_on_device = None
        if "storage" not in state:
            # Saved without contents: start over with an empty buffer (the corpus cursor still resumes).
            self.storage, self.pending, self.cursor = None, None, self.capacity
            self.slots = torch.arange(self.capacity)
            return
        self.slots = state["slots"].clone()
        self.cursor = int(state["cursor"])
        self.storage = None if state["storage"] is None else state["storage"].to(self.device, self.dtype)
        self.pending = None if state["pending"] is None else state["pending"].to(self.device, self.dtype)
