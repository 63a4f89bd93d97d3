"""The grouped top-k on CPU (``architectures/selection.py``) against ``torch.topk``: the same values (sorted, exactly)
and indices that point at them, distinct within a row, for random rows, rows with many ties, rows whose largest
entries crowd into few groups, masked rows (AuxK's -inf) and the flat batch of BatchTopK."""

from __future__ import annotations

import pytest
import torch

from neurolight.lightning_modules.sae.architectures.selection import _groups, topk

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_same_selection(values: torch.Tensor, k: int) -> None:
    got, indices = topk(values, k)
    expected = values.topk(k, dim=-1).values
    assert got.shape == indices.shape == expected.shape
    torch.testing.assert_close(got.sort(-1, descending=True).values, expected, rtol=0, atol=0)
    torch.testing.assert_close(values.gather(-1, indices), got, rtol=0, atol=0)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "an entry was chosen twice"


@pytest.mark.parametrize(("n", "k"), [(2304, 32), (2304, 16), (2304, 128), (4608, 64), (600, 32), (96, 6)])
def test_topk__random_rows_give_torch_topk_values(n, k):
    values = torch.randn(64, n, generator=torch.Generator().manual_seed(n + k))
    assert_same_selection(values, k)


def test_topk__the_demo_shapes_take_the_grouped_path():
    """Otherwise every other test here only compares torch.topk with itself."""
    assert _groups(2304, 32) == 288 and _groups(2304 * 512, 32 * 512) is not None
    assert _groups(2304, 288) is None  # k * c + m would not be much below n


def test_topk__ties_choose_as_many_equal_entries_as_torch():
    """Integer values in a narrow range: dozens of entries tie at the k-th largest value in every row."""
    values = torch.randint(0, 12, (64, 2304), generator=torch.Generator().manual_seed(0)).float()
    assert_same_selection(values, 32)


def test_topk__largest_entries_crowded_into_few_groups():
    """Every entry of a handful of groups (strided columns) is large: those groups hold most of the top k, and the
    rest must still come from the right other groups."""
    groups = _groups(2304, 32)
    values = torch.randn(16, 2304, generator=torch.Generator().manual_seed(1))
    values.view(16, -1, groups)[:, :, :3] += 10  # 3 groups of 8 entries: 24 of the top 32
    assert_same_selection(values, 32)
    values.view(16, -1, groups)[:, :, :5] += 10  # 40 entries: more than k in 5 groups
    assert_same_selection(values, 32)


def test_topk__masked_entries_as_auxk_masks_live_latents():
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(32, 2304, generator=generator)
    live = torch.rand(2304, generator=generator) < 0.9
    assert_same_selection(values.masked_fill(live, float("-inf")), 200)


def test_topk__flat_batch_and_leading_dimensions():
    values = torch.randn(64, 2304, generator=torch.Generator().manual_seed(3))
    assert_same_selection(values.flatten(), 32 * 64)
    assert_same_selection(values.view(4, 16, 2304), 32)
    assert_same_selection(values[:0].flatten(), 0)  # BatchTopK on an empty batch
