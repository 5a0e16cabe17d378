"""Resume index: which (id, prompt_name) keys OUT already holds, in flat memory.

Reads only the key columns of committed parts (and ``image``, to notice a manifest
that gives a known id another image). A key counts as done when its row is ``ok`` or
an error of a permanent class; an error of a transient class (``rate_limit``,
``server``, ``timeout``, ... see ``errors.TRANSIENT``) is pending again, so a plain
rerun finishes what a flaky night left. ``--retry-errors`` makes every error pending.

``load`` also repairs OUT before a run:
* leftover temporary files of a killed run are removed;
* a part that cannot be read, or whose key columns have the wrong type, is moved to
  ``OUT/_quarantine/`` (never deleted), and its rows are pending again;
* a key present more than once (a retried row beside the error it replaces, a merge
  or journal recovery interrupted at the wrong moment) is reduced to its best row:
  ``ok`` over ``error``, then the newest.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import TRANSIENT
from ..keys import ImageRefs, KeySet, column_key_hashes, hash_strings, hex64, key_hash
from .outdir import TMP_SUFFIX, check_part, commit_table, part_files, quarantine

__all__ = ["KeySet", "key_hash", "Checkpoint", "ResumeState", "Scan"]

_KEY_COLUMNS = ["id", "prompt_name", "status", "finished_at"]
_BATCH = 65_536
_TRANSIENT = pa.array(sorted(TRANSIENT))


@dataclass
class Scan:
    """What the key columns of the readable parts say, one array per part."""

    parts: list[Path] = field(default_factory=list)
    hashes: list[np.ndarray] = field(default_factory=list)   # key hash per row
    ok: list[np.ndarray] = field(default_factory=list)       # status == ok
    transient: list[np.ndarray] = field(default_factory=list)  # an error worth retrying
    ids: list[np.ndarray] = field(default_factory=list)      # hash of id, per ok row
    images: list[np.ndarray] = field(default_factory=list)   # hash of image, per ok row
    shas: list[np.ndarray] = field(default_factory=list)     # image_sha256 prefix, per ok row
    ok_by_prompt: Counter[str] = field(default_factory=Counter)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    def done(self, retry_errors: bool) -> KeySet:
        keys = KeySet()
        chosen = [h[ok] if retry_errors else h[~tr] for h, ok, tr
                  in zip(self.hashes, self.ok, self.transient)]
        if chosen:  # one sort for all parts, not one merge per part
            keys.add_many(np.concatenate(chosen))
        return keys


@dataclass
class ResumeState:
    done: KeySet
    rows_ok: int = 0
    rows_error: int = 0
    rows_retried: int = 0  # error rows that are pending again (transient, or all with
    #                        --retry-errors): this run replaces them
    duplicates_removed: int = 0
    temp_files_removed: int = 0
    quarantined: list[Path] = field(default_factory=list)
    parts: list[Path] = field(default_factory=list)
    ok_by_prompt: Counter[str] = field(default_factory=Counter)
    images: ImageRefs = field(default_factory=lambda: ImageRefs([], []))


class Checkpoint:
    def __init__(self, out: Path) -> None:
        self.out = out

    def load(self, retry_errors: bool) -> ResumeState:
        """Clean leftovers, quarantine bad parts, repair duplicates, index what is done."""
        temp = self._remove_temp_files()
        quarantined = self._quarantine_unusable()
        removed, scan = self._dedupe()
        for part, reason in scan.unreadable:  # readable footer, unreadable key columns
            quarantined.append(quarantine(self.out, part, reason))
        state = ResumeState(scan.done(retry_errors), duplicates_removed=removed,
                            temp_files_removed=temp, quarantined=quarantined,
                            parts=scan.parts, ok_by_prompt=scan.ok_by_prompt,
                            images=ImageRefs(scan.ids, scan.images, scan.shas))
        for ok, tr in zip(scan.ok, scan.transient):
            n_ok = int(ok.sum())
            state.rows_ok += n_ok
            state.rows_error += len(ok) - n_ok
            state.rows_retried += (len(ok) - n_ok) if retry_errors else int(tr.sum())
        return state

    def scan(self) -> Scan:
        """Read-only: no cleanup, no repair, no lock needed (``status``, ``--dry-run``);
        unusable parts are skipped and listed in ``unreadable``."""
        return self._scan(readonly=True)

    def done_keys(self, retry_errors: bool) -> KeySet:
        return self.scan().done(retry_errors)

    def repair(self) -> int:
        """Reduce every key to one row (after a run replaced error rows)."""
        return self._dedupe()[0]

    def _quarantine_unusable(self) -> list[Path]:
        moved = []
        for part in part_files(self.out):
            reason = check_part(part)
            if reason is not None:
                moved.append(quarantine(self.out, part, reason))
        return moved

    def _dedupe(self) -> tuple[int, Scan]:
        scan = self._scan()
        dups = _duplicates(scan.hashes)
        if not dups.size:
            return 0, scan
        touched = [p for p, h in zip(scan.parts, scan.hashes) if np.isin(h, dups).any()]
        removed = self._repair(touched, set(dups.tolist()))
        return removed, self._scan()

    def _scan(self, readonly: bool = False) -> Scan:
        scan = Scan()
        for part in part_files(self.out):
            if readonly and (reason := check_part(part)) is not None:
                scan.unreadable.append((part, reason))
                continue
            try:
                self._scan_part(part, scan)
            except (pa.ArrowException, OSError) as e:
                if isinstance(e, OSError) and e.errno is not None:
                    raise  # the disk, not the part
                scan.unreadable.append((part, f"key columns unreadable ({e})"))
        return scan

    @staticmethod
    def _scan_part(part: Path, scan: Scan) -> None:
        pf = pq.ParquetFile(part)
        names = pf.schema_arrow.names
        cols = [c for c in ("id", "prompt_name", "status", "error_class", "image",
                            "image_sha256") if c in names]
        arrays: dict[str, list[np.ndarray]] = {k: [] for k in
                                              ("h", "ok", "tr", "id", "img", "sha")}
        # In batches: a 500k-row part as Python strings at once would cost 100+ MB.
        for t in pf.iter_batches(_BATCH, columns=cols):
            ok = pc.equal(t["status"], "ok").fill_null(False)
            arrays["h"].append(_hashes(t))
            arrays["ok"].append(ok.to_numpy(zero_copy_only=False))
            arrays["tr"].append(_transient(t, ok))
            if "image" in cols:  # only ok rows: an error row's image may have been fixed
                kept = pc.filter(t, ok)
                ids = pc.fill_null(kept["id"], "").to_pylist()
                arrays["id"].append(hash_strings(ids, len(ids)))
                images = pc.fill_null(kept["image"], "").to_pylist()
                arrays["img"].append(hash_strings(images, len(images)))
                sha = kept["image_sha256"] if "image_sha256" in cols else None
                arrays["sha"].append(np.zeros(len(ids), np.int64) if sha is None
                                     else hex64(pc.fill_null(sha, "0")))
            vc = pc.value_counts(pc.filter(pc.fill_null(t["prompt_name"], ""), ok))
            scan.ok_by_prompt.update(dict(zip(vc.field("values").to_pylist(),
                                              vc.field("counts").to_pylist())))
        empty = {"h": np.int64, "ok": bool, "tr": bool, "id": np.int64, "img": np.int64,
                 "sha": np.int64}
        joined = {k: np.concatenate(v) if v else np.empty(0, empty[k])
                  for k, v in arrays.items()}
        scan.parts.append(part)
        scan.hashes.append(joined["h"])
        scan.ok.append(joined["ok"])
        scan.transient.append(joined["tr"])
        scan.ids.append(joined["id"])
        scan.images.append(joined["img"])
        scan.shas.append(joined["sha"])

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


def _transient(t: pa.RecordBatch, ok: pa.Array) -> np.ndarray:
    """Error rows of a transient class: pending again at the next run."""
    if "error_class" not in t.schema.names:
        return np.zeros(len(t), dtype=bool)
    is_transient = pc.is_in(t["error_class"], value_set=_TRANSIENT).fill_null(False)
    return np.asarray(pc.and_(pc.invert(ok), is_transient).to_numpy(zero_copy_only=False),
                      dtype=bool)


def _rank_key(rank: tuple[bool, object, int, int]) -> tuple[bool, float, int, int]:
    ok, when, i, j = rank
    ts = when.timestamp() if hasattr(when, "timestamp") else 0.0
    return (ok, ts, i, j)


def _duplicates(hashes: list[np.ndarray]) -> np.ndarray:
    if not hashes:
        return np.empty(0, dtype=np.int64)
    s = np.sort(np.concatenate(hashes))
    return np.unique(s[1:][s[1:] == s[:-1]])


def _hashes(t: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The key hash of every row (``keys.column_key_hashes``)."""
    return column_key_hashes(t["id"], t["prompt_name"])
