"""The output directory's layout: what is data, what is bookkeeping, and keeping it readable.

Only committed parts (``part-*.parquet``) are data; everything else in OUT starts with
``_`` or ``.``, which pyarrow, pandas and DuckDB's ``OUT/*.parquet`` glob all skip:

    OUT/part-<run>-<seq>.parquet   committed rows (atomic: temp → fsync → rename)
    OUT/.lock                      the run lock (flock)
    OUT/.<name>.<rand>.tmp         a part being written (removed at the next start)
    OUT/_dataset.json              what made the dataset (``dataset_record``)
    OUT/_journal/                  finished rows not yet in a part (``journal``)
    OUT/_runs/<run id>.json        one report per run
    OUT/_quarantine/               parts that could not be read, moved aside, never deleted
    OUT/_report.html               the review gallery

Readers take one part's schema for the whole dataset, so parts must agree on it: when
a manifest gains a column between runs, the older parts are rewritten with that
column added as nulls (``unify``), streamed batch by batch.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["TMP_SUFFIX", "part_files", "fsync_dir", "fsync_file", "tmp_name", "commit_table",
           "quarantine", "check_part", "union_schema", "unify", "QUARANTINE", "JOURNAL",
           "RUNS", "RECORD", "REPORT"]

log = logging.getLogger("pipeline")

TMP_SUFFIX = ".tmp"
QUARANTINE = "_quarantine"
JOURNAL = "_journal"
RUNS = "_runs"
RECORD = "_dataset.json"
REPORT = "_report.html"
KEY_COLUMNS = ("id", "prompt_name", "status")
_BATCH = 65_536


def part_files(out: Path) -> list[Path]:
    """Committed parts, in name order (= commit order within a run)."""
    return sorted(p for p in out.glob("part-*.parquet") if p.is_file())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def commit_table(table: pa.Table, final: Path) -> None:
    """Write ``table`` to ``final`` atomically (temp → fsync → rename → fsync dir).

    A failed write removes its temporary file: on a full disk that space is what the
    run needs to write its report and the rows still in memory.
    """
    tmp = tmp_name(final)
    try:
        pq.write_table(table, tmp, compression="zstd")
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


@dataclass(frozen=True)
class PartProblem:
    part: Path
    reason: str


def check_part(part: Path) -> str | None:
    """Why ``part`` cannot be a data part (unreadable, foreign, wrong key types), or None."""
    try:
        schema = pq.ParquetFile(part).schema_arrow
    except (OSError, pa.ArrowException) as e:
        return f"not a readable Parquet file ({_first_line(e)})"
    for name in KEY_COLUMNS:
        if name not in schema.names:
            return f"no {name!r} column: not a part of this dataset"
        t = schema.field(name).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            return f"column {name!r} has type {t}, not string"
    return None


def quarantine(out: Path, part: Path, reason: str) -> Path:
    """Move ``part`` to ``OUT/_quarantine/`` (never deleted), saying so in one line."""
    target_dir = out / QUARANTINE
    target_dir.mkdir(exist_ok=True)
    target = target_dir / part.name
    n = 1
    while target.exists():
        n += 1
        target = target_dir / f"{part.stem}.{n}{part.suffix}"
    os.replace(part, target)
    fsync_dir(out)
    log.warning("quarantined %s: %s; moved to %s, its rows are pending again", part, reason,
                target)
    return target


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def union_schema(base: pa.Schema, parts: list[Path]) -> pa.Schema:
    """``base`` (this run's columns) plus every column an existing part has beyond it."""
    fields = list(base)
    names = set(base.names)
    for part in parts:
        for f in pq.ParquetFile(part).schema_arrow:
            if f.name not in names:
                names.add(f.name)
                fields.append(f)
    return pa.schema(fields)


def unify(parts: list[Path], schema: pa.Schema) -> list[PartProblem]:
    """Rewrite every part whose schema is not ``schema`` (missing columns as nulls).

    Returns the parts that could not be converted (a column of an incompatible type):
    the caller quarantines them.
    """
    problems = []
    for part in parts:
        if pq.ParquetFile(part).schema_arrow.remove_metadata().equals(schema):
            continue
        try:
            rewrite(part, schema)
        except (pa.ArrowException, ValueError) as e:
            problems.append(PartProblem(part, f"cannot be read as this dataset's schema "
                                              f"({_first_line(e)})"))
    return problems


def conform_batch(batch: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.Table:
    """``batch`` with ``schema``'s columns in order: missing ones null, others cast."""
    t = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    cols = []
    for f in schema:
        if f.name in t.column_names:
            col = t.column(f.name)
            cols.append(col if col.type.equals(f.type) else col.cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def rewrite(part: Path, schema: pa.Schema) -> None:
    """``part`` again with ``schema``, batch by batch (flat memory), committed atomically."""
    tmp = tmp_name(part)
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in pq.ParquetFile(part).iter_batches(_BATCH):
                writer.write_table(conform_batch(batch, schema))
        fsync_file(tmp)
        os.replace(tmp, part)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(part.parent)
