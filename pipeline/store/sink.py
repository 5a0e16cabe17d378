"""The only writer of output rows: a journal at once, Parquet parts in batches.

Every row is conformed to the output schema (``validate.RowConformer``: no value can
make a write fail) and appended to the journal (``journal``: durable within a fraction
of a second), then buffered until ``flush_rows`` rows or ``flush_seconds`` have
gathered and committed as one part (``outdir.commit_table``: temp → fsync → rename →
fsync dir, so a crash at any instant leaves either the whole part or none of it).
At the end of a run, small parts are merged into larger ones (write merged, then
remove the originals; a crash in between only leaves duplicates, which the
checkpoint's repair removes on the next start).

Any OSError from here (a full disk, no descriptors left, OUT gone or read-only) is
the caller's signal to stop the run: ``errors.output_error`` turns it into exit 6.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..redact import redact, redact_obj
from ..validate import RowConformer
from .journal import Journal, recover, segments
from .outdir import (
    JOURNAL,
    RUNS,
    commit_table,
    conform_batch,
    fsync_dir,
    fsync_file,
    part_files,
    quarantine,
    tmp_name,
)

__all__ = ["ParquetSink", "Batch", "commit_table", "part_files", "compact",
           "write_run_report", "recover_journal"]

log = logging.getLogger("pipeline")

_COMPACT_BELOW = 20_000      # parts smaller than this are merged at the end of a run
_MERGED_MAX_ROWS = 500_000   # merged parts stop growing here


@dataclass
class Batch:
    """Rows taken for one part, and the journal segment that holds them meanwhile."""

    rows: list[dict[str, Any]]
    segment: Path | None = None

    def __len__(self) -> int:
        return len(self.rows)


class ParquetSink:
    """Journals each row at once and commits parts every ``flush_rows`` rows or seconds."""

    def __init__(self, out: Path, schema: pa.Schema, run_id: str, flush_rows: int,
                 flush_seconds: float, clock: Callable[[], float] = time.monotonic,
                 journal: bool = True, scrub: Callable[[str], str] = redact) -> None:
        self.out = out
        self.schema = schema
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.clock = clock
        self.conform = RowConformer(schema, scrub)
        self.journal = Journal(out / JOURNAL, run_id) if journal else None
        self._rows: list[dict[str, Any]] = []
        self._seq = 0
        self._last_flush = clock()
        self.rows_written = 0
        self.parts: list[Path] = []

    def add(self, row: dict[str, Any]) -> None:
        """Buffer and journal one row. OSError: the journal cannot be written (the row
        stays buffered, so a last flush may still commit it)."""
        clean = self.conform(row)  # every string redacted: whatever a server echoed back
        self._rows.append(clean)
        if self.journal is not None:
            self.journal.append(clean)

    def pending_rows(self) -> list[dict[str, Any]]:
        """The buffered rows (a copy), without taking them."""
        return list(self._rows)

    @property
    def buffered(self) -> int:
        return len(self._rows)

    @property
    def due(self) -> bool:
        if not self._rows:
            return False
        return (len(self._rows) >= self.flush_rows
                or self.clock() - self._last_flush >= self.flush_seconds)

    def seconds_until_due(self) -> float:
        return max(0.0, self.flush_seconds - (self.clock() - self._last_flush))

    def take(self) -> Batch:
        rows, self._rows = self._rows, []
        self._last_flush = self.clock()
        segment = self.journal.rotate() if self.journal is not None else None
        return Batch(rows, segment)

    def sync(self) -> None:
        """Group commit of the journal (blocking: call it from a thread)."""
        if self.journal is not None:
            self.journal.sync()

    def write(self, batch: Batch | list[dict[str, Any]]) -> Path | None:
        """Commit ``batch`` as one part (blocking: call it from a thread)."""
        if isinstance(batch, list):
            batch = Batch(batch)
        if not batch.rows:
            Journal.discard(batch.segment)
            return None
        self._seq += 1
        final = self.out / f"part-{self.run_id}-{self._seq:06d}.parquet"
        commit_table(to_table(batch.rows, self.schema), final)
        Journal.discard(batch.segment)  # its rows are in the part now
        self.rows_written += len(batch.rows)
        self.parts.append(final)
        return final

    def close(self) -> None:
        """Never raises: it runs last, also after the disk or the descriptors failed."""
        if self.journal is not None:
            with contextlib.suppress(OSError):
                self.journal.close()
                if not segments(self.journal.dir):
                    self.journal.dir.rmdir()  # nothing left to recover: no empty folder


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (already conformed) as a table; a row Arrow still refuses is replaced by an
    error row saying so, rather than failing the whole part."""
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    kept = []
    for row in rows:
        try:
            pa.Table.from_pylist([row], schema=schema)
            kept.append(row)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
            log.error("row %r could not be stored as given (%s); kept as an error row",
                      row.get("id"), e)
            kept.append({"id": row.get("id"), "prompt_name": row.get("prompt_name"),
                         "image": row.get("image"), "line": row.get("line"),
                         "status": "error", "error_class": "internal",
                         "error": f"internal: the result could not be stored ({e})"[:300],
                         "finished_at": row.get("finished_at")})
    return pa.Table.from_pylist(kept, schema=schema)


def recover_journal(out: Path, schema: pa.Schema, run_id: str) -> int:
    """Fold the segments a killed run left behind into parts; returns rows recovered."""
    n = 0
    for k, segment in enumerate(segments(out / JOURNAL), 1):
        raw = list(recover(segment))  # one segment: at most a flush's worth of rows
        if raw:
            # Columns of the manifest the killed run had, which this run's may lack.
            extra = sorted({name for r in raw for name in r} - set(schema.names))
            full = pa.schema([*schema, *(pa.field(c, pa.string()) for c in extra)])
            conform = RowConformer(full)
            rows = [conform(r) for r in raw]
            commit_table(to_table(rows, full), out / f"part-{run_id}-j{k:05d}.parquet")
            n += len(rows)
        Journal.discard(segment)
    if n:
        log.warning("recovered %d finished rows from the journal of an interrupted run", n)
    return n


def write_run_report(out: Path, run_id: str, report: dict[str, Any]) -> Path:
    """OUT/_runs/<run id>.json, written atomically like the parts, every string redacted."""
    runs = out / RUNS
    runs.mkdir(exist_ok=True)
    final = runs / f"{run_id}.json"
    tmp = tmp_name(final)
    text = json.dumps(redact_obj(json.loads(json.dumps(report, default=str))), indent=2)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def compact(out: Path, parts: Iterable[Path], run_id: str, schema: pa.Schema) -> int:
    """Merge small parts into larger ones with flat memory; returns parts removed.

    Every part is conformed to ``schema`` (the union of every column the dataset has),
    so the merged parts agree on it. A part that cannot be read is quarantined.
    """
    small: list[tuple[Path, int]] = []
    for p in parts:
        if p.exists():
            n = pq.ParquetFile(p).metadata.num_rows
            if n < _COMPACT_BELOW:
                small.append((p, n))
    removed = 0
    for k, group in enumerate(_groups(small), 1):
        if len(group) < 2:
            continue
        merged = _merge(out, group, out / f"part-{run_id}-m{k:03d}.parquet", schema)
        for p in merged:  # a crash here only leaves duplicates, repaired on start
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


def _merge(out: Path, group: list[Path], final: Path, schema: pa.Schema) -> list[Path]:
    """Write the parts of ``group`` that can be read into ``final``; returns them."""
    tmp = tmp_name(final)
    merged = []
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for p in group:
                try:  # reading: a failure is the part's (a write failure is the disk's)
                    table = conform_batch(pq.read_table(p), schema)
                except (pa.ArrowException, OSError) as e:
                    if isinstance(e, OSError) and e.errno is not None:
                        raise  # the disk could not be read: stop, quarantine nothing
                    quarantine(out, p, f"unreadable during the merge ({e})")
                    continue
                writer.write_table(table)
                merged.append(p)
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return merged
