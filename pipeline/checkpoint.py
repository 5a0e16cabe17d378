"""Resume index: which (id, prompt_name) keys OUT already holds, in flat memory.

Reads only the key columns of committed parts. Keys are kept as 64-bit hashes in a
sorted NumPy array (8 bytes a key) plus a small set of recent additions, so a million
finished rows cost megabytes, not the hundreds a set of strings would.

It also repairs OUT: leftover temporary files of a killed run are removed, and a key
present more than once (a ``--retry-errors`` result beside the error it replaces, or
a merge interrupted before its originals were removed) is reduced to its best row:
``ok`` over ``error``, then the newest.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .sink import TMP_SUFFIX, commit_table, part_files

__all__ = ["KeySet", "key_hash", "Checkpoint", "ImageIndex", "ResumeState"]

_KEY_COLUMNS = ["id", "prompt_name", "status", "finished_at"]
_BATCH = 65_536


def key_hash(rid: str, prompt_name: str) -> int:
    # Process-local hash: the index is rebuilt from OUT at every start, never stored.
    return hash(rid + "\x1f" + prompt_name)


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


@dataclass
class ResumeState:
    done: KeySet
    rows_ok: int = 0
    rows_error: int = 0
    duplicates_removed: int = 0
    temp_files_removed: int = 0
    parts: list[Path] = field(default_factory=list)


class Checkpoint:
    def __init__(self, out: Path) -> None:
        self.out = out

    def load(self, retry_errors: bool) -> ResumeState:
        """Clean leftovers, repair duplicates, and index the keys that count as done."""
        state = ResumeState(KeySet())
        state.temp_files_removed = self._remove_temp_files()
        removed, (parts, hashes, oks) = self._dedupe()
        state.duplicates_removed = removed
        state.parts = parts
        done = []
        for h, ok in zip(hashes, oks):
            n_ok = int(ok.sum())
            state.rows_ok += n_ok
            state.rows_error += len(ok) - n_ok
            done.append(h[ok] if retry_errors else h)
        if done:  # one sort for all parts, not one merge per part
            state.done.add_many(np.concatenate(done))
        return state

    def done_keys(self, retry_errors: bool) -> KeySet:
        """The keys that count as done, read-only: no cleanup, no repair, no lock needed."""
        done = KeySet()
        _, hashes, oks = self._scan()
        if hashes:
            done.add_many(np.concatenate([h[ok] if retry_errors else h
                                          for h, ok in zip(hashes, oks)]))
        return done

    def repair(self) -> int:
        """Reduce every key to one row (after ``--retry-errors`` wrote replacements)."""
        return self._dedupe()[0]

    def _dedupe(self) -> tuple[int, tuple[list[Path], list[np.ndarray], list[np.ndarray]]]:
        scan = self._scan()
        parts, hashes, _ = scan
        dups = _duplicates(hashes)
        if not dups.size:
            return 0, scan
        touched = [p for p, h in zip(parts, hashes) if np.isin(h, dups).any()]
        removed = self._repair(touched, set(dups.tolist()))
        return removed, self._scan()

    def _scan(self) -> tuple[list[Path], list[np.ndarray], list[np.ndarray]]:
        parts = part_files(self.out)
        hashes: list[np.ndarray] = []
        oks: list[np.ndarray] = []
        for part in parts:
            h: list[np.ndarray] = []
            ok: list[np.ndarray] = []
            # In batches: a 500k-row part as Python strings at once would cost 100+ MB.
            for t in pq.ParquetFile(part).iter_batches(_BATCH, columns=["id", "prompt_name",
                                                                        "status"]):
                h.append(_hashes(t))
                ok.append(pc.equal(t["status"], "ok").fill_null(False).to_numpy(
                    zero_copy_only=False))
            hashes.append(np.concatenate(h) if h else np.empty(0, np.int64))
            oks.append(np.concatenate(ok) if ok else np.empty(0, bool))
        return parts, hashes, oks

    def _remove_temp_files(self) -> int:
        n = 0
        for p in self.out.glob(f".*{TMP_SUFFIX}"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def _repair(self, parts: list[Path], dups: set[int]) -> int:
        """Keep one row per duplicated key (ok beats error, newer beats older)."""
        winners = self._winners(parts, dups)
        return sum(self._rewrite_without_losers(part, i, dups, winners)
                   for i, part in enumerate(parts))

    @staticmethod
    def _winners(parts: list[Path], dups: set[int]) -> dict[int, tuple[bool, object, int, int]]:
        best: dict[int, tuple[bool, object, int, int]] = {}
        for i, part in enumerate(parts):
            t = pq.ParquetFile(part).read(columns=_KEY_COLUMNS)
            hashes = _hashes(t)
            status = t["status"].to_pylist()
            when = t["finished_at"].to_pylist()
            for j, h in enumerate(hashes):
                h = int(h)
                if h in dups:
                    rank = (status[j] == "ok", when[j] or 0, i, j)
                    if h not in best or _rank_key(rank) > _rank_key(best[h]):
                        best[h] = rank
        return best

    def _rewrite_without_losers(self, part: Path, i: int, dups: set[int],
                                winners: dict[int, tuple[bool, object, int, int]]) -> int:
        t = pq.read_table(part)
        hashes = _hashes(t)
        keep = [not (int(h) in dups and winners[int(h)][2:] != (i, j))
                for j, h in enumerate(hashes)]
        dropped = keep.count(False)
        if not dropped:
            return 0
        if dropped == len(keep):
            part.unlink()
        else:
            commit_table(t.filter(pa.array(keep)), part)
        return dropped


def _rank_key(rank: tuple[bool, object, int, int]) -> tuple[bool, float, int, int]:
    ok, when, i, j = rank
    ts = when.timestamp() if hasattr(when, "timestamp") else 0.0
    return (ok, ts, i, j)


def _duplicates(hashes: list[np.ndarray]) -> np.ndarray:
    if not hashes:
        return np.empty(0, dtype=np.int64)
    s = np.sort(np.concatenate(hashes))
    return np.unique(s[1:][s[1:] == s[:-1]])


def _hashes(t: pa.Table) -> np.ndarray:
    """key_hash of every row, with the joining done by Arrow and hashing by ``map``."""
    ids = pc.fill_null(t["id"], "")
    names = pc.fill_null(t["prompt_name"], "")
    keys = pc.binary_join_element_wise(ids, names, "\x1f").to_pylist()
    return np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys))


class ImageIndex:
    """Where OUT holds an ok row for each dedup key: 16 bytes a row, rows read lazily.

    A dedup key is hex; its first 16 digits, read as a 64-bit integer in bulk by NumPy,
    index it, so a million finished rows cost no Python string at all.
    """

    def __init__(self, parts: list[Path]) -> None:
        self.parts = parts
        keys: list[np.ndarray] = []
        refs: list[np.ndarray] = []
        for i, part in enumerate(parts):
            pf = pq.ParquetFile(part)
            if "dedup_key" not in pf.schema_arrow.names:
                continue  # written before images were keyed
            offset = 0
            for t in pf.iter_batches(_BATCH, columns=["dedup_key", "status"]):
                ok = pc.and_(pc.equal(t["status"], "ok"), pc.is_valid(t["dedup_key"]))
                rows = np.flatnonzero(ok.fill_null(False).to_numpy(zero_copy_only=False))
                keys.append(_hex64(t["dedup_key"].take(pa.array(rows))))
                refs.append((np.int64(i) << 32) | (rows + offset).astype(np.int64))
                offset += t.num_rows
        all_keys = np.concatenate(keys) if keys else np.empty(0, np.int64)
        order = np.argsort(all_keys, kind="stable")
        self._keys = all_keys[order]
        self._refs = (np.concatenate(refs) if refs else np.empty(0, np.int64))[order]
        self._cache: tuple[int, pa.Table] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The original ok row for ``key`` (id and caption fields), or None."""
        h = _hex64_one(key)
        i = int(np.searchsorted(self._keys, h))
        while i < len(self._keys) and int(self._keys[i]) == h:
            ref = int(self._refs[i])
            row = self._row(ref >> 32, ref & 0xFFFFFFFF)
            if row.get("dedup_key") == key:  # guard against a collision of the prefixes
                return row
            i += 1
        return None

    def _row(self, part: int, row: int) -> dict[str, Any]:
        with self._lock:  # lookups run in worker threads; one cached part at a time
            if self._cache is None or self._cache[0] != part:
                self._cache = (part, pq.read_table(self.parts[part], columns=_ORIGINAL))
            return self._cache[1].slice(row, 1).to_pylist()[0]


_HEX = np.zeros(256, dtype=np.uint64)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint64)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint64)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint64)


def _hex64(keys: pa.Array) -> np.ndarray:
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


def _hex64_one(key: str) -> int:
    return int(_hex64(pa.array([key]))[0])


_ORIGINAL = ["id", "dedup_key", "caption", "finish_reason", "finish_reason_raw", "model",
             "response_id", "terminal"]
