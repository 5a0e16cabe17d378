"""KeySet: flat-memory sets of 64-bit key hashes."""

from __future__ import annotations

import numpy as np

from pipeline.keys import KeySet


def test_single_and_batched_adds_are_members_before_and_after_a_merge() -> None:
    keys = KeySet()
    keys.add(5)
    keys.add_batch(np.array([9, 1, 9], dtype=np.int64))
    assert 5 in keys and 1 in keys and 9 in keys and 2 not in keys
    probe = np.array([1, 2, 5, 9, 10], dtype=np.int64)
    assert keys.contains_many(probe).tolist() == [True, False, True, True, False]
    assert len(keys) == 3  # merged: unique members
    assert keys.sorted_array().tolist() == [1, 5, 9]
    assert keys.contains_many(probe).tolist() == [True, False, True, True, False]


def test_batches_merge_once_enough_are_waiting_and_stay_unique() -> None:
    keys = KeySet()
    keys._MERGE_AT = 10  # type: ignore[misc]
    for start in range(0, 40, 4):
        keys.add_batch(np.arange(start, start + 8, dtype=np.int64))  # overlapping runs
    assert len(keys._batches) < 10  # merged along the way
    assert keys.sorted_array().tolist() == list(range(44))


def test_a_million_batched_adds_keep_every_member_once() -> None:
    keys = KeySet()
    rng = np.random.default_rng(0)
    values = rng.integers(-2**63, 2**63 - 1, size=1_000_000, dtype=np.int64)
    for block in np.array_split(values, 250):
        keys.add_batch(block)
    assert len(keys) == len(np.unique(values))
    assert keys.contains_many(values[::1000]).all()
