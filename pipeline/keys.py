"""Sets of row keys in flat memory: 64-bit hashes in sorted NumPy arrays.

A million finished rows cost megabytes, not the hundreds a set of strings would.

The key hash (``key_hash``, ``key_hashes``) is the one hash of a row's key (id,
prompt name): BLAKE2b cut to 64 bits, the same value in every process, so the set can
be built on the driver and shipped to a Ray task. Everything that decides whether a
key is done uses it: the checkpoint, the planner, ``status``, the engines.
``hash_strings`` is a faster process-local hash (Python's ``hash``) for indexes that
never leave the process (which image an id had).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["KeySet", "key_hash", "key_hashes", "column_key_hashes", "hash_strings",
           "ImageRefs", "PartRows", "hex64", "hex64_one"]

_SEP = "\x1f"  # between id and prompt name; no manifest value contains a unit separator


def _digests(keys: Iterable[bytes]) -> bytes:
    blake = hashlib.blake2b
    return b"".join(blake(k, digest_size=8).digest() for k in keys)


def key_hash(rid: str, prompt_name: str) -> int:
    """The hash of one key (see ``key_hashes``)."""
    return int(key_hashes([rid], prompt_name)[0])


def key_hashes(ids: Iterable[str], prompt_name: str) -> np.ndarray:
    """The key hash of (id, ``prompt_name``) for each id, as int64 (~0.4 µs a key)."""
    suffix = (_SEP + prompt_name).encode("utf-8", "surrogateescape")
    raw = _digests(i.encode("utf-8", "surrogateescape") + suffix for i in ids)
    return np.frombuffer(raw, dtype=np.int64).copy()


def column_key_hashes(ids: pa.Array | pa.ChunkedArray,
                      names: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Key hashes of Arrow columns of ids and prompt names (nulls count as "")."""
    joined = pc.binary_join_element_wise(pc.fill_null(ids, ""), pc.fill_null(names, ""),
                                         _SEP)
    raw = _digests(v.encode("utf-8", "surrogateescape") for v in joined.to_pylist())
    return np.frombuffer(raw, dtype=np.int64).copy()


def hash_strings(values: Iterable[str], count: int) -> np.ndarray:
    """Process-local 64-bit hashes, for indexes rebuilt at each start (never shipped)."""
    return np.fromiter(map(hash, values), dtype=np.int64, count=count)


class KeySet:
    """A set of 64-bit hashes: one sorted array plus bounded recent adds (single ones in
    a set, vectorised ones as arrays), merged into the array once there are enough."""

    _MERGE_AT = 65_536

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.int64)
        self._recent: set[int] = set()
        self._batches: list[np.ndarray] = []
        self._batched = 0

    @classmethod
    def from_sorted(cls, hashes: np.ndarray) -> KeySet:
        """A set over an already sorted, unique array (e.g. one shipped to a Ray task)."""
        keys = cls()
        keys._sorted = hashes
        return keys

    def sorted_array(self) -> np.ndarray:
        """Every member, sorted and unique (what ``from_sorted`` takes)."""
        self._merge()
        return self._sorted

    def __len__(self) -> int:
        self._merge()
        return len(self._sorted)

    def __contains__(self, h: int) -> bool:
        if h in self._recent:
            return True
        for arr in (self._sorted, *self._batches):
            if len(arr):  # a NumPy call costs microseconds even on an empty array
                i = int(np.searchsorted(arr, h))
                if i < len(arr) and int(arr[i]) == h:
                    return True
        return False

    def add(self, h: int) -> None:
        self.add_if_new(h)

    def add_if_new(self, h: int) -> bool:
        """Add ``h``; False when it was a member already (one lookup for both)."""
        if h in self:
            return False
        self._recent.add(h)
        if len(self._recent) >= self._MERGE_AT:
            self._merge()
        return True

    def add_batch(self, hashes: np.ndarray) -> None:
        """Add many at once, cheaply: merged into the array later, with other adds."""
        if len(hashes):
            self._batches.append(np.unique(hashes.astype(np.int64)))
            self._batched += len(hashes)
            if self._batched >= self._MERGE_AT:
                self._merge()

    def contains_many(self, hashes: np.ndarray) -> np.ndarray:
        """Membership of each hash, vectorised (one searchsorted per sorted array)."""
        found = np.zeros(len(hashes), dtype=bool)
        # Queries in sorted order walk the array forwards: 2.5x faster on a million keys.
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        for arr in (self._sorted, *self._batches):
            if len(arr):
                i = np.minimum(np.searchsorted(arr, ordered), len(arr) - 1)
                found[order] |= arr[i] == ordered
        if self._recent:
            recent = np.fromiter(self._recent, dtype=np.int64, count=len(self._recent))
            found |= np.isin(hashes, recent)
        return found

    def add_many(self, hashes: np.ndarray) -> None:
        self.add_batch(hashes)
        self._merge()

    def _merge(self) -> None:
        if not (self._recent or self._batches):
            return
        if not self._batches:
            # Only single adds, all new (``add`` checked): sorted and inserted, one new
            # array of the final size (the planner's duplicate-id set over 1 M pending
            # rows peaks at 131 MB this way, 186 MB through a concatenation and sort).
            new = np.fromiter(self._recent, dtype=np.int64, count=len(self._recent))
            new.sort()
            self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, new), new)
            self._recent.clear()
            return
        parts = [self._sorted, *self._batches]
        if self._recent:
            parts.append(np.fromiter(self._recent, dtype=np.int64, count=len(self._recent)))
        # Sorted runs, concatenated: a stable sort (timsort) merges them in about linear
        # time, where np.union1d would sort from scratch (seconds for a million keys).
        merged = np.sort(np.concatenate(parts), kind="stable")
        if len(merged) > 1:
            merged = merged[np.concatenate(([True], merged[1:] != merged[:-1]))]
        self._sorted = merged
        self._recent.clear()
        self._batches.clear()
        self._batched = 0


class ImageRefs:
    """Which image each id of OUT was captioned from: a hash of the ``image`` value and
    the first 64 bits of the image's sha256 (0 where unknown), 24 bytes per ok row.

    A manifest that gives a known id another image is not the manifest OUT was made
    from: ``conflicts`` finds such rows by value before any request, ``sha_conflict``
    by content once a pending row's image is read.
    """

    def __init__(self, ids: list[np.ndarray], images: list[np.ndarray],
                 shas: list[np.ndarray] | None = None) -> None:
        all_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
        all_images = np.concatenate(images) if images else np.empty(0, np.int64)
        all_shas = np.concatenate(shas) if shas else np.zeros(len(all_ids), np.int64)
        order = np.argsort(all_ids, kind="stable")
        self._ids = all_ids[order]
        self._images = all_images[order]
        self._shas = all_shas[order]

    def __len__(self) -> int:
        return len(self._ids)

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        return i, self._ids[i] == ids

    def conflicts(self, ids: np.ndarray, images: np.ndarray) -> np.ndarray:
        """For each (id, image) hash pair: does OUT hold that id for another image?"""
        if not len(self._ids):
            return np.zeros(len(ids), dtype=bool)
        # An id may appear once per prompt name, all with the same image: compare the
        # first occurrence (an already mixed dataset only makes this more cautious).
        i, known = self._find(ids)
        return np.asarray(known & (self._images[i] != images), dtype=bool)

    def classify(self, ids: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(known, conflicting) masks: is the id in OUT, and for another image?"""
        if not len(self._ids):
            none = np.zeros(len(ids), dtype=bool)
            return none, none
        i, known = self._find(ids)
        return known, known & (self._images[i] != images)

    def sha_conflict(self, rid: str, sha256: str) -> bool:
        """Does OUT hold ``rid`` for an image with other content?"""
        if not len(self._ids):
            return False
        i, known = self._find(np.array([hash(rid)], dtype=np.int64))
        stored = int(self._shas[i[0]])
        return bool(known[0]) and stored != 0 and stored != hex64_one(sha256)


_HEX = np.zeros(256, dtype=np.uint64)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint64)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint64)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint64)


def hex64(keys: pa.Array) -> np.ndarray:
    """The first 16 hex digits of each key as int64, vectorised (no Python strings)."""
    n = len(keys)
    if n == 0:
        return np.empty(0, np.int64)
    prefix = pc.cast(pc.utf8_slice_codeunits(pc.utf8_rpad(keys, 16, "0"), 0, 16),
                     pa.binary(16))
    digits = _HEX[np.frombuffer(prefix.buffers()[1], np.uint8,
                                count=16 * n, offset=16 * prefix.offset).reshape(n, 16)]
    out = np.zeros(n, dtype=np.uint64)
    for j in range(16):
        out = (out << np.uint64(4)) | digits[:, j]
    return out.view(np.int64)


def hex64_one(key: str) -> int:
    return int(hex64(pa.array([key]))[0])


class PartRows:
    """An index from a 64-bit key to rows of OUT's parts: 16 bytes a row (the key, and
    part << 32 | row), sorted once; a row's columns are read when asked for, one cached
    part at a time. ``add`` takes each batch's keys and row positions as they are read.
    Used for what OUT holds per dedup key (``images.dedupe``) and per (id, prompt) key
    (``store.captions``)."""

    def __init__(self, parts: list[Path], columns: list[str]) -> None:
        self.parts, self.columns = parts, columns
        self._keys: list[np.ndarray] = []
        self._refs: list[np.ndarray] = []
        self._cache: tuple[int, pa.Table] | None = None
        self._lock = threading.Lock()

    def add(self, part: int, keys: np.ndarray, rows: np.ndarray) -> None:
        self._keys.append(keys)
        self._refs.append((np.int64(part) << 32) | rows.astype(np.int64))

    def seal(self) -> PartRows:
        keys = np.concatenate(self._keys) if self._keys else np.empty(0, np.int64)
        order = np.argsort(keys, kind="stable")
        refs = np.concatenate(self._refs) if self._refs else np.empty(0, np.int64)
        self.keys, self.refs = keys[order], refs[order]
        self._keys, self._refs = [], []
        return self

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, h: int) -> Iterator[dict[str, Any]]:
        """The rows indexed under ``h``, in the order they were added (the caller
        checks the full key: 64 bits may collide)."""
        lo, hi = np.searchsorted(self.keys, h, "left"), np.searchsorted(self.keys, h, "right")
        for i in range(int(lo), int(hi)):
            ref = int(self.refs[i])
            yield self._row(ref >> 32, ref & 0xFFFFFFFF)

    def _row(self, part: int, row: int) -> dict[str, Any]:
        with self._lock:  # lookups run in worker threads; one cached part at a time
            if self._cache is None or self._cache[0] != part:
                names = pq.read_schema(self.parts[part]).names  # older parts: fewer columns
                self._cache = (part, pq.read_table(
                    self.parts[part], columns=[c for c in self.columns if c in names]))
            found: dict[str, Any] = self._cache[1].slice(row, 1).to_pylist()[0]
            return found
