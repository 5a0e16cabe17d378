"""An ended batch's results → result rows, streamed into the run's sink as they are read.

Results come in any order; each names its row by ``custom_id`` (``<entry>-<index>``).
The rows file is indexed by byte offset first (8 bytes a row), so a result costs one
seek, and memory stays flat whatever the batch holds. A result for a key OUT already
holds (a collection killed half way, then rerun) is skipped; a result seen twice counts
once. Rows whose request the results never mention stay pending (no row is written).
Copies of an identical image in the same file are written after their original.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TRANSIENT
from ..keys import KeySet
from ..pacing.cost import Price
from ..records import ManifestRow, Original, ResultRow, copied_row, error_row, ok_row
from ..wire.adapters.base import Adapter
from .files import index_of
from .ledger import Entry
from .results import Outcome, parse_result

__all__ = ["Collected", "collect", "manifest_row"]

log = logging.getLogger("pipeline")


@dataclass
class Collected:
    rows: int = 0
    ok: int = 0
    transient: list[int] = field(default_factory=list)  # key hashes pending again
    skipped: int = 0       # already in OUT, or seen before
    foreign: int = 0       # lines that are not results of this entry
    interrupted: bool = False  # the run stopped before every result was read

    def transient_keys(self) -> np.ndarray:
        return np.asarray(self.transient, dtype=np.int64)


class RowsFile:
    """The entry's rows, by index, read on demand."""

    def __init__(self, path: Path) -> None:
        offsets, pos = [], 0
        self.f = path.open("rb")
        for line in self.f:
            offsets.append(pos)
            pos += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, i: int) -> dict[str, Any]:
        self.f.seek(int(self.offsets[i]))
        doc: dict[str, Any] = json.loads(self.f.readline())
        return doc

    def close(self) -> None:
        self.f.close()


def manifest_row(r: dict[str, Any]) -> ManifestRow:
    return ManifestRow(r["id"], r["image"], None, r["line"], r.get("extra") or {},
                       prompt_name=r["prompt_name"])


def to_row(r: dict[str, Any], o: Outcome, entry: Entry, price: Price | None) -> ResultRow:
    """The row the online lane would write for this answer (lane, batch id, batch cost)."""
    row, columns = manifest_row(r), dict(r.get("columns") or {})
    common = {"lane": "batch", "batch_id": entry.batch_id, "attempts": 1,
              "request_id": o.request_id, "http_status": o.http_status}
    if o.completion is not None:
        u = o.completion.usage
        cost = price.cost(u.prompt_tokens, u.completion_tokens) if price and u else None
        return ok_row(row, o.completion, cost_usd=cost, **common, **columns)
    e = o.error
    assert e is not None
    extra: dict[str, Any] = {}
    if e.usage is not None:
        extra.update(prompt_tokens=e.usage.prompt_tokens,
                     completion_tokens=e.usage.completion_tokens,
                     total_tokens=e.usage.total_tokens, usage_source="reported")
        if price is not None:
            extra["cost_usd"] = price.cost(e.usage.prompt_tokens, e.usage.completion_tokens)
    if e.finish_reason_raw:
        extra["finish_reason_raw"] = e.finish_reason_raw
    if common["http_status"] is None:
        common["http_status"] = e.http_status
    return error_row(row, e.message, e.error_class, **common, **columns, **extra)


async def collect(entry: Entry, lines: AsyncIterator[bytes], rows_path: Path,
                  adapter: Adapter, price: Price | None, done: KeySet,
                  keep: Callable[[ResultRow], None], room: Callable[[], Awaitable[None]],
                  stop: Callable[[], bool] = lambda: False, hold_transient: bool = False
                  ) -> Collected:
    """Stream the results into ``keep``; ``done`` (the keys OUT holds) grows with every
    final row, so a later plan of the same run does not send them again.
    ``hold_transient``: a row that ended transiently is not written but only listed
    (``transient``): this run sends it again, so it stays pending (as an online retry)."""
    rows = RowsFile(rows_path)
    seen = np.zeros(len(rows), dtype=bool)
    originals: dict[int, Original] = {}
    wanted = {r["copy_of"] for _, r in _iter(rows) if r.get("copy_of") is not None}
    got = Collected()
    try:
        async for raw in lines:
            if stop():
                got.interrupted = True
                return got
            o = parse_result(entry.api, raw, adapter)
            i = index_of(entry.lid, o.custom_id) if o is not None else None
            if o is None or i is None or i >= len(rows):
                got.foreign += 1
                continue
            if seen[i]:
                got.skipped += 1
                continue
            seen[i] = True
            r = rows.get(i)
            row = to_row(r, o, entry, price)
            if i in wanted and row.ok:
                originals[i] = Original.of(row)
            if int(r["key"]) in done:
                got.skipped += 1  # kept by the run this collection was killed in
                continue
            await room()
            _keep(row, int(r["key"]), done, keep, got, hold_transient)
        for _, r in _iter(rows):
            if stop():
                got.interrupted = True
                return got
            original = originals.get(r.get("copy_of", -1))
            if original is None or int(r["key"]) in done:
                continue  # its original failed: the copy stays pending, asked itself later
            await room()
            row = copied_row(manifest_row(r), original, **(r.get("columns") or {}))
            _keep(replace(row, lane="batch", batch_id=entry.batch_id), int(r["key"]), done,
                  keep, got)
    finally:
        rows.close()
    return got


def _iter(rows: RowsFile) -> list[tuple[int, dict[str, Any]]]:
    """Rows that copy another (few): scanned once per collection."""
    return [(i, r) for i in range(len(rows)) if (r := rows.get(i)).get("copy_of") is not None]


def _keep(row: ResultRow, key: int, done: KeySet, keep: Callable[[ResultRow], None],
          got: Collected, hold_transient: bool = False) -> None:
    final = row.ok or row.error_class not in TRANSIENT
    if not final:
        got.transient.append(key)
        if hold_transient:
            return
    keep(row)
    got.rows += 1
    if row.ok:
        got.ok += 1
    if final:
        done.add(key)
