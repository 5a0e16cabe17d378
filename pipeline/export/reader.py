"""Reading the committed dataset of OUT for an export: one row per key, in flat memory.

OUT's data is its ``part-*.parquet`` files (everything starting with ``_`` or ``.`` is
bookkeeping). After a completed run each key (``id``, ``prompt_name``) has one row; a
killed run may leave a key twice (an error row beside the retry that replaced it, a
journal folded in twice). An export takes, per key, the best row: ``ok`` beats
``error``, then the newest ``finished_at``, then the later part. Error rows are only
exported when asked.

Two passes over the parts, both in batches:

1. the key columns only: a 64-bit hash per row (8 bytes a row, the same index the
   resume checkpoint keeps), sorted once to find duplicated keys; only the rows of
   those keys (none, after a completed run) are read again to pick the winners;
2. the wanted columns, batch by batch, with the losers, the unwanted statuses and the
   unwanted prompt names filtered out by Arrow.

Nothing here writes to OUT. While it reads, it holds a shared lock on ``OUT/.lock``,
so a caption run cannot merge (and delete) parts under it; a run that holds the lock
already makes the export stop with one line (exit 4).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..keys import column_key_hashes
from ..store.outdir import RECORD, part_files
from .base import ExportError

__all__ = ["Committed", "Selection", "open_committed"]

_KEYS = ["id", "prompt_name", "status", "finished_at"]
_BATCH = 2048  # rows per batch in pass 2: a few MB of Arrow, whatever the dataset's size
_KEY_BATCH = 16_384
_READ_BUFFER = 1 << 20  # read column chunks through a 1 MiB buffer, not whole
_NEVER = np.iinfo(np.int64).min  # finished_at of a row that has none: older than any


@dataclass
class Selection:
    """What pass 1 decided: the rows to drop per part and what will be exported."""

    losers: list[np.ndarray]          # per part: sorted row indices beaten by another row
    rows: int = 0                     # rows that will be exported
    prompt_names: Counter[str] = field(default_factory=Counter)  # exported rows per name
    duplicates: int = 0               # rows dropped because a better row has their key
    errors_left_out: int = 0          # keys whose best row is an error (no --include-errors)
    all_prompt_names: Counter[str] = field(default_factory=Counter)  # rows per name in OUT


class Committed:
    """The committed parts of OUT with one schema, and where relative images start."""

    def __init__(self, out: Path, parts: list[Path], schema: pa.Schema,
                 record: dict[str, Any] | None) -> None:
        self.out, self.parts, self.schema, self.record = out, parts, schema, record

    @property
    def base_dir(self) -> Path | None:
        """The folder relative ``image`` values resolve against (the manifest's)."""
        manifest = (self.record or {}).get("manifest")
        base = manifest.get("base_dir") if isinstance(manifest, dict) else None
        return Path(base) if isinstance(base, str) and base else None

    def prompt_order(self) -> list[str]:
        """Prompt names in the order ``_dataset.json`` lists them (their definition order)."""
        prompts = (self.record or {}).get("prompts")
        return [str(k) for k in prompts] if isinstance(prompts, dict) else []

    def null_columns(self) -> set[str]:
        """Columns that hold no value in any part (from Parquet statistics only)."""
        nulls = set(self.schema.names)
        for part in self.parts:
            md = pq.ParquetFile(part).metadata
            names = md.schema.to_arrow_schema().names
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                for i, name in enumerate(names):
                    if name not in nulls:
                        continue
                    stats = rg.column(i).statistics
                    if stats is None or not stats.has_null_count or \
                            stats.null_count < rg.num_rows:
                        nulls.discard(name)
        return nulls

    # ------------------------------------------------------------------ pass 1

    def select(self, include_errors: bool, prompt_names: Sequence[str] | None) -> Selection:
        chunks: list[np.ndarray] = []
        selected = 0
        names: Counter[str] = Counter()
        wanted = pa.array(list(prompt_names)) if prompt_names else None
        for part in self.parts:
            for b in self._batches(part, _KEYS, _KEY_BATCH):
                chunks.append(_hashes(b))
                selected += int(pc.sum(_wanted(b, include_errors, wanted)).as_py() or 0)
                vc = pc.value_counts(pc.fill_null(b["prompt_name"], ""))
                names.update(dict(zip(vc.field("values").to_pylist(),
                                      vc.field("counts").to_pylist())))
        dups = _duplicated(chunks)  # consumes chunks: one 8-byte array, sorted in place
        sel = Selection([np.empty(0, np.int64) for _ in self.parts])
        if dups.size:
            sel.losers, sel.duplicates, lost = self._losers(dups, include_errors, wanted)
            selected -= lost
        sel.rows = selected
        sel.all_prompt_names = names
        sel.prompt_names, sel.errors_left_out = self._counts(sel, include_errors, wanted)
        return sel

    def _losers(self, dups: np.ndarray, include_errors: bool,
                wanted: pa.Array | None) -> tuple[list[np.ndarray], int, int]:
        """Per part, the rows of duplicated keys that lose to a better row of their key."""
        cand_h, cand_rank, cand_where, cand_sel = [], [], [], []
        for i, part in enumerate(self.parts):
            start = 0
            for b in self._batches(part, _KEYS, _KEY_BATCH):
                h = _hashes(b)
                local = np.flatnonzero(np.isin(h, dups))
                here = local + start
                start += b.num_rows
                if not local.size:
                    continue
                t = b.take(pa.array(local))
                ok = pc.equal(t["status"], "ok").fill_null(False).to_numpy(
                    zero_copy_only=False)
                when = pc.fill_null(t["finished_at"].cast(pa.int64()), _NEVER).to_numpy()
                cand_h.append(h[local])
                cand_rank.append(np.stack([ok.astype(np.int64), when,
                                           np.full(here.size, i), here]))
                cand_where.append(np.stack([np.full(here.size, i), here]))
                cand_sel.append(_wanted(t, include_errors, wanted).to_numpy(
                    zero_copy_only=False))
        h = np.concatenate(cand_h)
        rank = np.concatenate(cand_rank, axis=1)
        where = np.concatenate(cand_where, axis=1)
        chosen = np.concatenate(cand_sel)
        # Sort by key, then rank ascending: the last row of each key is its winner.
        order = np.lexsort((rank[3], rank[2], rank[1], rank[0], h))
        is_last = np.append(h[order][1:] != h[order][:-1], True)
        lose = order[~is_last]
        losers = [np.sort(where[1][lose][where[0][lose] == i]) for i in range(len(self.parts))]
        return losers, int(lose.size), int(chosen[lose].sum())

    def _counts(self, sel: Selection, include_errors: bool,
                wanted: pa.Array | None) -> tuple[Counter[str], int]:
        """Exported rows per prompt name, and the keys left out for being errors."""
        names: Counter[str] = Counter()
        errors = 0
        for b in self.batches(["prompt_name", "status"], sel, True, None):
            vc = pc.value_counts(pc.filter(pc.fill_null(b["prompt_name"], ""),
                                           _wanted(b, include_errors, wanted)))
            names.update(dict(zip(vc.field("values").to_pylist(),
                                  vc.field("counts").to_pylist())))
            if not include_errors:
                error = pc.and_(pc.invert(_wanted(b, False, None)), _wanted(b, True, wanted))
                errors += int(pc.sum(error).as_py() or 0)
        return names, errors

    # ------------------------------------------------------------------ pass 2

    def batches(self, columns: Sequence[str], sel: Selection, include_errors: bool,
                prompt_names: Sequence[str] | None,
                batch_size: int = _BATCH) -> Iterator[pa.RecordBatch]:
        """The exported rows, ``columns`` only (plus ``status`` and ``prompt_name``)."""
        wanted = pa.array(list(prompt_names)) if prompt_names else None
        cols = list(dict.fromkeys([*columns, "status", "prompt_name"]))
        for part, losers in zip(self.parts, sel.losers):
            start = 0
            for b in self._batches(part, cols, batch_size):
                keep = _wanted(b, include_errors, wanted)
                if losers.size:
                    mask = np.ones(b.num_rows, dtype=bool)
                    lo, hi = np.searchsorted(losers, [start, start + b.num_rows])
                    mask[losers[lo:hi] - start] = False
                    keep = pc.and_(keep, pa.array(mask))
                start += b.num_rows
                kept = b.filter(keep)
                if kept.num_rows:
                    yield kept

    def _batches(self, part: Path, columns: Sequence[str],
                 size: int) -> Iterator[pa.RecordBatch]:
        schema = pa.schema([self.schema.field(c) for c in columns])
        try:
            pf = pq.ParquetFile(part, buffer_size=_READ_BUFFER, pre_buffer=False)
            present = [c for c in columns if c in pf.schema_arrow.names]
            for b in pf.iter_batches(size, columns=present, use_threads=False):
                yield _conform(b, schema)
        except FileNotFoundError:
            raise ExportError(f"{part} disappeared while exporting (did a caption run "
                              "start on OUT?); export again", exit_code=2) from None
        except (OSError, pa.ArrowException, ValueError) as e:
            raise ExportError(f"{part}: cannot be read ({_first_line(e)}); the next "
                              "caption run moves it to _quarantine/", exit_code=2) from None


def _conform(b: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``b`` with ``schema``'s columns in order: missing ones null (an older part)."""
    cols = []
    for f in schema:
        i = b.schema.get_field_index(f.name)
        col = b.column(i) if i >= 0 else pa.nulls(b.num_rows, f.type)
        cols.append(col if col.type.equals(f.type) else col.cast(f.type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _wanted(b: pa.RecordBatch | pa.Table, include_errors: bool,
            wanted: pa.Array | None) -> pa.Array:
    """The rows of the wanted statuses and prompt names, as a boolean mask."""
    mask = pc.equal(b["status"], "ok").fill_null(False)
    if include_errors:
        mask = pa.array(np.ones(len(b), dtype=bool))
    if wanted is not None:
        mask = pc.and_(mask, pc.is_in(b["prompt_name"], value_set=wanted).fill_null(False))
    return mask


def _hashes(b: pa.RecordBatch) -> np.ndarray:
    """The key hash of every row: the checkpoint's own (``keys.column_key_hashes``)."""
    return column_key_hashes(b["id"], b["prompt_name"])


def _duplicated(chunks: list[np.ndarray]) -> np.ndarray:
    """The hashes that occur more than once; empties ``chunks`` as it goes (memory)."""
    if not chunks:
        return np.empty(0, np.int64)
    s = np.concatenate(chunks)
    chunks.clear()
    s.sort()
    return np.unique(s[1:][s[1:] == s[:-1]])


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _record(out: Path) -> dict[str, Any] | None:
    """``_dataset.json``, or None when it is absent, unreadable or not an object."""
    try:
        doc = json.loads((out / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _schema(parts: list[Path]) -> pa.Schema:
    schemas = []
    for part in parts:
        try:
            schema = pq.read_schema(part).remove_metadata()
        except (OSError, pa.ArrowException) as e:
            raise ExportError(f"{part}: not a readable Parquet file ({_first_line(e)}); the "
                              "next caption run moves it to _quarantine/", exit_code=2) from None
        for name in ("id", "prompt_name", "status"):
            if name not in schema.names or not pa.types.is_string(schema.field(name).type):
                raise ExportError(f"{part} is not a part of a caption dataset: no string "
                                  f"column {name!r}", exit_code=2)
        schemas.append(schema)
    try:
        schema = pa.unify_schemas(schemas)
    except (pa.ArrowException, ValueError) as e:
        raise ExportError(f"the parts of {parts[0].parent} disagree on a column's type "
                          f"({_first_line(e)})", exit_code=2) from None
    if "finished_at" not in schema.names:
        schema = schema.append(pa.field("finished_at", pa.timestamp("us", tz="UTC")))
    return schema


@contextlib.contextmanager
def open_committed(out: Path) -> Iterator[Committed]:
    """OUT's committed dataset, under a shared lock; ExportError (exit 2/4) when unusable."""
    if not out.is_dir():
        raise ExportError(f"{out} is not a directory (OUT is a caption run's --out)",
                          exit_code=2)
    parts = part_files(out)
    if not parts:
        raise ExportError(f"{out} holds no committed rows (no part-*.parquet files)",
                          exit_code=2)
    with _shared_lock(out):
        yield Committed(out, parts, _schema(parts), _record(out))


@contextlib.contextmanager
def _shared_lock(out: Path) -> Iterator[None]:
    try:
        fd = os.open(out / ".lock", os.O_RDONLY)
    except OSError:  # no run ever locked OUT, or it is not ours to open: read unlocked
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ExportError(f"{out} is being written by a caption run (pid {pid}); "
                              "export when it has finished", exit_code=4) from None
        yield
    finally:
        os.close(fd)
