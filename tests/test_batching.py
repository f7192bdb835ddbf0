"""Length bucketing: batches cut where padding costs more than another forward pass."""

import math

from hypothesis import given
from hypothesis import strategies as st

from eeengine.batching import length_sorted_batches, split_padding


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_unsplit_batches_are_cut_by_rows_longest_first():
    lengths = [3, 9, 5, 7, 1]
    assert length_sorted_batches(lengths, 2) == [[1, 3], [2, 0], [4]]


def test_cut_where_the_saving_exceeds_the_cost():
    # Longest first: 50 48 10 9 8 8 (rows 0..5). Cutting before row 2 pads four rows to 10
    # instead of 50: 4 * 40 = 160 tokens saved; no other cut saves more than 4.
    lengths = [50, 48, 10, 9, 8, 8]
    assert length_sorted_batches(lengths, 6, split_cost=100) == [[0, 1], [2, 3, 4, 5]]
    assert length_sorted_batches(lengths, 6, split_cost=160) == [[0, 1, 2, 3, 4, 5]]
    # At cost 3 the short part is cut again: before row 4 saves 2 * (10 - 8) = 4.
    assert length_sorted_batches(lengths, 6, split_cost=3) == [[0, 1], [2, 3], [4, 5]]


def test_equal_lengths_are_never_cut():
    assert split_padding([0, 1, 2], [7, 7, 7], 0) == [[0, 1, 2]]
    assert split_padding([4], [1, 1, 1, 1, 2], 0) == [[4]]


@given(
    st.lists(st.integers(1, 128), min_size=1, max_size=80),
    st.integers(1, 40),
    st.sampled_from([0, 16, 64, 500, math.inf]),
)
def test_a_partition_that_never_costs_more(lengths, batch_size, split_cost):
    unsplit = length_sorted_batches(lengths, batch_size)
    batches = length_sorted_batches(lengths, batch_size, split_cost)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= batch_size for b in batches)
    for b in batches:  # every batch longest first
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # Every cut saved more than it costs: padded tokens plus split_cost per extra pass.
    extra = len(batches) - len(unsplit)
    if split_cost == math.inf:
        assert batches == unsplit
    else:
        saved = padded_tokens(unsplit, lengths) - padded_tokens(batches, lengths)
        assert saved >= extra * split_cost and (extra == 0 or saved > extra * split_cost)
