import pytest
import torch

from neurolight.datamodules.sae.activation_buffer import ActivationBuffer


class Producer:
    """Chunks of 37 rows whose single feature is a global row id (37 does not divide the buffer: overflow)."""

    def __init__(self, chunk: int = 37) -> None:
        self.chunk, self.made = chunk, 0

    def __call__(self) -> torch.Tensor:
        rows = torch.arange(self.made, self.made + self.chunk, dtype=torch.float32).unsqueeze(1)
        self.made += self.chunk
        return rows


def served_ids(buffer: ActivationBuffer, batches: int) -> list[int]:
    return [int(v) for _ in range(batches) for v in buffer.next_batch()[:, 0]]


def test_buffer__serves_every_harvested_row_exactly_once():
    producer = Producer()
    buffer = ActivationBuffer(capacity=160, batch_size=16, produce=producer, seed=0)
    ids = served_ids(buffer, 100)  # 20 refill cycles
    assert len(ids) == len(set(ids)) == 1600
    held = {int(v) for v in buffer.storage[buffer.slots[buffer.cursor :], 0]}
    pending = {int(v) for v in buffer.pending[:, 0]} if buffer.pending is not None else set()
    # Nothing harvested is lost: served + still held + overflow waiting = everything produced.
    assert set(ids) | held | pending == set(range(producer.made))
    assert not (set(ids) & held) and not (held & pending)


def test_buffer__mixes_across_refills():
    buffer = ActivationBuffer(capacity=160, batch_size=16, produce=Producer(), seed=0)
    first = served_ids(buffer, 5)
    # A served half-buffer is drawn from all 160 rows, not from the first 80 in order.
    assert max(first) > 80 and first != sorted(first)


def test_buffer__state_dict_resumes_identically():
    a = ActivationBuffer(capacity=160, batch_size=16, produce=Producer(), seed=3)
    served_ids(a, 13)
    state = a.state_dict()
    producer_b = Producer()
    producer_b.made = a.produce.made
    b = ActivationBuffer(capacity=160, batch_size=16, produce=producer_b, seed=99)
    b.load_state_dict(state)
    assert served_ids(a, 30) == served_ids(b, 30)


def test_buffer__too_small_capacity_is_an_error():
    with pytest.raises(ValueError, match="num_batches_preload >= 2"):
        ActivationBuffer(capacity=16, batch_size=16, produce=Producer())
