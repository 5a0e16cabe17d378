"""The only writer of output rows: buffered Parquet part files, committed atomically.

A part is written under a dot-name that no reader picks up (pyarrow, pandas and
``OUT/*.parquet`` globs all skip it), fsynced, renamed into place and the directory
fsynced, so a crash at any instant leaves either the whole part or none of it.
At the end of a run, small parts are merged into larger ones (write merged, then
remove the originals; a crash in between only leaves duplicates, which the
checkpoint's repair removes on the next start).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .redact import redact_obj

__all__ = ["ParquetSink", "commit_table", "part_files", "fsync_dir", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"
_COMPACT_BELOW = 20_000      # parts smaller than this are merged at the end of a run
_MERGED_MAX_ROWS = 500_000   # merged parts stop growing here


def part_files(out: Path) -> list[Path]:
    """Committed parts, in name order (= commit order within a run)."""
    return sorted(p for p in out.glob("part-*.parquet") if p.is_file())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def commit_table(table: pa.Table, final: Path) -> None:
    """Write ``table`` to ``final`` atomically (temp → fsync → rename → fsync dir)."""
    tmp = _tmp_name(final)
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


class ParquetSink:
    """Buffers result rows and commits them as parts every ``flush_rows`` rows or seconds."""

    def __init__(self, out: Path, schema: pa.Schema, run_id: str, flush_rows: int,
                 flush_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.schema = schema
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.clock = clock
        self._rows: list[dict[str, Any]] = []
        self._seq = 0
        self._last_flush = clock()
        self.rows_written = 0
        self.parts: list[Path] = []

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)

    @property
    def due(self) -> bool:
        if not self._rows:
            return False
        return (len(self._rows) >= self.flush_rows
                or self.clock() - self._last_flush >= self.flush_seconds)

    def seconds_until_due(self) -> float:
        return max(0.0, self.flush_seconds - (self.clock() - self._last_flush))

    def take(self) -> list[dict[str, Any]]:
        rows, self._rows = self._rows, []
        self._last_flush = self.clock()
        return rows

    def write(self, rows: list[dict[str, Any]]) -> Path | None:
        """Commit ``rows`` as one part (blocking: call it from a thread)."""
        if not rows:
            return None
        self._seq += 1
        final = self.out / f"part-{self.run_id}-{self._seq:06d}.parquet"
        commit_table(pa.Table.from_pylist(rows, schema=self.schema), final)
        self.rows_written += len(rows)
        self.parts.append(final)
        return final


def write_run_report(out: Path, run_id: str, report: dict[str, Any]) -> Path:
    """OUT/_runs/<run id>.json, written atomically like the parts, every string redacted."""
    runs = out / "_runs"
    runs.mkdir(exist_ok=True)
    final = runs / f"{run_id}.json"
    tmp = _tmp_name(final)
    text = json.dumps(redact_obj(json.loads(json.dumps(report, default=str))), indent=2)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, final)
    return final


def compact(out: Path, parts: Iterable[Path], run_id: str) -> int:
    """Merge small parts into larger ones with flat memory; returns parts removed.

    Only parts with the same schema are merged (a manifest may have gained a column
    between runs); the merged part is committed before the originals are removed.
    """
    by_schema: dict[str, list[tuple[Path, int]]] = {}
    for p in parts:
        if not p.exists():
            continue
        meta = pq.ParquetFile(p)
        if meta.metadata.num_rows < _COMPACT_BELOW:
            by_schema.setdefault(meta.schema_arrow.to_string(), []).append(
                (p, meta.metadata.num_rows))
    removed = 0
    k = 0
    for small in by_schema.values():
        for group in _groups(small):
            if len(group) < 2:
                continue
            k += 1
            _merge(group, out / f"part-{run_id}-m{k:03d}.parquet")
            for p in group:  # a crash here only leaves duplicates, repaired on start
                p.unlink()
                removed += 1
            fsync_dir(out)
    return removed


def _groups(parts: list[tuple[Path, int]]) -> list[list[Path]]:
    groups: list[list[Path]] = [[]]
    rows = 0
    for p, n in parts:
        if rows + n > _MERGED_MAX_ROWS and groups[-1]:
            groups.append([])
            rows = 0
        groups[-1].append(p)
        rows += n
    return groups


def _merge(group: list[Path], final: Path) -> None:
    tmp = _tmp_name(final)
    schema = pq.ParquetFile(group[0]).schema_arrow
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for p in group:
            writer.write_table(pq.read_table(p))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)
