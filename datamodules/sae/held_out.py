"""The held-out batches of the SAE data modules, so that under DDP every held-out context or row is validated once.

Lightning splits a map-style validation set across ranks with a ``DistributedSampler``, which pads a count that the
world size does not divide by repeating items: those would count twice in the validation metrics. Cutting the held-out
set into a multiple of ``world_size`` batches of near-equal sizes gives every rank the same number of batches (no rank
waits in a collective for another: ZeRO-3 gathers weights in every forward) and repeats nothing.
"""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import Dataset


def held_out_batches(num_items: int, batch_size: int, world_size: int, what: str) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges that cover ``0 .. num_items`` once: batches of ``batch_size`` (the last one shorter) on
    one process; under DDP the fewest batches of at most ``batch_size`` items whose count ``world_size`` divides, their
    sizes differing by one at most. ``what`` names the items in the error raised when that is impossible."""
    if world_size == 1:
        return [(start, min(start + batch_size, num_items)) for start in range(0, num_items, batch_size)]
    count = world_size * -(-num_items // (world_size * batch_size))
    if count > num_items:
        raise ValueError(
            f"{num_items} held-out {what} in batches of at most {batch_size} cannot give each of the {world_size} "
            f"ranks the same number of non-empty batches; hold out at least {count} {what}, or raise the batch size"
        )
    base, extra = divmod(num_items, count)
    stops = [(index + 1) * base + min(index + 1, extra) for index in range(count)]
    return list(zip([0, *stops[:-1]], stops))


class HeldOutBatches(Dataset):
    """The batches ``held_out_batches`` cuts ``items`` (a tensor of held-out contexts) into: one per index."""

    def __init__(self, items: Tensor, ranges: list[tuple[int, int]]) -> None:
        self.items, self.ranges = items, ranges

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, index: int) -> Tensor:
        start, stop = self.ranges[index]
        return self.items[start:stop]
