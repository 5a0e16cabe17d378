"""KeySet holds exactly the hashes added, across merges of its recent adds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.keys import KeySet


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=300))
def test_a_keyset_is_the_set_of_what_was_added(values: list[int]) -> None:
    keys = KeySet()
    keys._MERGE_AT = 7  # type: ignore[misc]  # merge often: the sorted insert is exercised
    for v in values:
        keys.add(v)
        assert v in keys
    assert len(keys) == len(set(values))
    assert keys.sorted_array().tolist() == sorted(set(values))
    probe = np.array(values + [0, 1, -1], dtype=np.int64)
    assert keys.contains_many(probe).tolist() == [int(p) in set(values) for p in probe]


def test_merging_many_adds_keeps_them_sorted_and_unique() -> None:
    rng = np.random.default_rng(7)
    values = rng.integers(-(2**62), 2**62, 200_000)
    keys = KeySet()
    for v in values.tolist():
        keys.add(v)
    arr = keys.sorted_array()
    assert np.all(arr[1:] > arr[:-1]) and len(arr) == len(np.unique(values))


@pytest.mark.parametrize("n", [0, 1])
def test_an_empty_or_single_keyset_merges(n: int) -> None:
    keys = KeySet()
    for v in range(n):
        keys.add(v)
    assert keys.sorted_array().tolist() == list(range(n))
