"""Sets of row keys in flat memory: 64-bit hashes in sorted NumPy arrays.

A million finished rows cost megabytes, not the hundreds a set of strings would.
Hashes are process-local (Python's ``hash``): every index is rebuilt from OUT at each
start and never stored.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["KeySet", "key_hash", "hash_strings", "ImageRefs"]


def key_hash(rid: str, prompt_name: str) -> int:
    return hash(rid + "\x1f" + prompt_name)


def hash_strings(values: Iterable[str], count: int) -> np.ndarray:
    return np.fromiter(map(hash, values), dtype=np.int64, count=count)


class KeySet:
    """A set of 64-bit hashes: one sorted array plus a bounded set of recent adds."""

    _MERGE_AT = 65_536

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.int64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, h: int) -> bool:
        if h in self._recent:
            return True
        arr = self._sorted
        i = int(np.searchsorted(arr, h))
        return i < len(arr) and int(arr[i]) == h

    def add(self, h: int) -> None:
        if h not in self:
            self._recent.add(h)
            if len(self._recent) >= self._MERGE_AT:
                self._merge()

    def contains_many(self, hashes: np.ndarray) -> np.ndarray:
        """Membership of each hash, vectorised (one searchsorted for the whole array)."""
        arr = self._sorted
        if len(arr):
            i = np.minimum(np.searchsorted(arr, hashes), len(arr) - 1)
            found = arr[i] == hashes
        else:
            found = np.zeros(len(hashes), dtype=bool)
        if self._recent:
            recent = np.fromiter(self._recent, dtype=np.int64, count=len(self._recent))
            found |= np.isin(hashes, recent)
        return found

    def add_many(self, hashes: np.ndarray) -> None:
        self._merge()
        self._sorted = np.union1d(self._sorted, hashes.astype(np.int64))

    def _merge(self) -> None:
        if self._recent:
            new = np.fromiter(self._recent, dtype=np.int64, count=len(self._recent))
            self._sorted = np.union1d(self._sorted, new)
            self._recent.clear()


class ImageRefs:
    """Which image each id of OUT was captioned from (hash of the ``image`` value).

    A manifest that gives a known id another image is not the manifest OUT was made
    from: ``conflicts`` finds such rows, 16 bytes of memory per id.
    """

    def __init__(self, ids: list[np.ndarray], images: list[np.ndarray]) -> None:
        all_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
        all_images = np.concatenate(images) if images else np.empty(0, np.int64)
        order = np.argsort(all_ids, kind="stable")
        self._ids = all_ids[order]
        self._images = all_images[order]

    def __len__(self) -> int:
        return len(self._ids)

    def conflicts(self, ids: np.ndarray, images: np.ndarray) -> np.ndarray:
        """For each (id, image) hash pair: does OUT hold that id for another image?"""
        if not len(self._ids):
            return np.zeros(len(ids), dtype=bool)
        i = np.searchsorted(self._ids, ids)
        i_clip = np.minimum(i, len(self._ids) - 1)
        known = self._ids[i_clip] == ids
        # An id may appear once per prompt name, all with the same image: compare the
        # first occurrence (an already mixed dataset only makes this more cautious).
        return known & (self._images[i_clip] != images)
