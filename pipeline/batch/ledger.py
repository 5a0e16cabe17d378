"""The batch lane's ledger: ``OUT/_batches/``, one JSON file per request file, written
atomically (temporary name, fsync, rename, fsync of the folder) *before* every side
effect, so a run killed at any point knows what it may have done.

An entry moves ``built`` (its request file is complete: hash, size, count) →
``uploaded`` (OpenAI: the file id) → ``creating`` (about to create the batch; the
batch carries the entry's id and file hash as metadata) → ``created`` (batch id) →
``ended`` (the provider finished it) → ``collected`` (every result is in the journal).
``split`` (a provider refused the file as too large: two halves replaced it) and
``failed`` (the provider refused the batch: its rows are pending again) end an entry
without results. A run that finds ``creating`` looks for the batch before creating
one (it may have been created just before the kill): nothing is submitted twice.

Next to each entry: ``<lid>.requests.jsonl`` (the request lines sent) and
``<lid>.rows.jsonl`` (per row index, what the result row needs besides the answer).
Both are removed once the entry is collected.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..keys import KeySet
from ..store.outdir import fsync_dir

__all__ = ["ENDED", "IN_FLIGHT", "Entry", "Ledger", "in_flight_keys", "new_lid"]

IN_FLIGHT = ("built", "uploaded", "creating", "created")   # submitted, or about to be
ENDED = ("ended",)                                          # results waiting to be read
FINAL = ("collected", "split", "failed", "cancelled")
MAX_ENTRY_BYTES = 1 << 20  # an entry is a few hundred bytes: a larger file is not ours


def new_lid() -> str:
    """An entry id: short, and valid inside a custom_id (``[A-Za-z0-9_-]``, ≤ 64)."""
    return "cp" + time.strftime("%y%m%d%H%M%S", time.gmtime()) + secrets.token_hex(3)


@dataclass
class Entry:
    lid: str
    api: str
    model: str
    run_id: str
    state: str = "built"
    sha256: str = ""
    requests: int = 0        # request lines in the file
    rows: int = 0            # row indexes (requests plus copies of identical images)
    bytes: int = 0
    est_cost_usd: float = 0.0
    parent: str | None = None  # the entry this one is half of (a split after a 413)
    endpoint: str = ""         # --base-url without credentials (for `cancel`)
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the provider's own word for the batch's state
    creating_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_url: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    collected: int = 0
    note: str | None = None
    updated_at: float = 0.0

    @property
    def in_flight(self) -> bool:
        return self.state in IN_FLIGHT or self.state in ENDED

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Entry:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


class Ledger:
    def __init__(self, folder: Path) -> None:
        self.dir = folder

    def requests_path(self, lid: str) -> Path:
        return self.dir / f"{lid}.requests.jsonl"

    def rows_path(self, lid: str) -> Path:
        return self.dir / f"{lid}.rows.jsonl"

    def save(self, entry: Entry) -> None:
        """Replace the entry atomically and durably (the rename is fsynced too)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        entry.updated_at = time.time()
        tmp = self.dir / f".{entry.lid}.json.tmp"
        data = json.dumps(asdict(entry), indent=1, sort_keys=True).encode()
        with open(tmp, "wb") as f:  # write() of a file object writes it all (os.write may not)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"{entry.lid}.json")
        fsync_dir(self.dir)

    def entries(self) -> Iterator[Entry]:
        """Every readable entry, oldest first; a damaged file is skipped (and said)."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("cp*.json"), key=lambda p: p.name):
            entry = read_entry(path)
            if entry is not None:
                yield entry

    def open_entries(self) -> list[Entry]:
        """Entries with something left to do; a half whose split was not recorded as
        done makes its parent ``split`` (the kill fell between the two writes)."""
        entries = list(self.entries())
        parents = {e.parent for e in entries if e.parent}
        out = []
        for e in entries:
            if e.lid in parents and e.state in ("built", "uploaded"):
                e.state, e.note = "split", "split into two halves (recovered)"
                self.save(e)
            if e.in_flight:
                out.append(e)
        return out

    def remove_orphans(self) -> int:
        """Request and rows files no entry names (a kill while a file was being built,
        before it was sealed): nothing was sent from them. Call under OUT's lock."""
        if not self.dir.is_dir():
            return 0
        known = {p.name.removesuffix(".json") for p in self.dir.glob("cp*.json")}
        removed = 0
        for path in [*self.dir.glob("cp*.requests.jsonl"), *self.dir.glob("cp*.rows.jsonl")]:
            if path.name.split(".", 1)[0] not in known:
                path.unlink(missing_ok=True)
                removed += 1
        for tmp in self.dir.glob(".cp*.json.tmp"):
            tmp.unlink(missing_ok=True)
        return removed

    def discard_files(self, entry: Entry) -> None:
        for path in (self.requests_path(entry.lid), self.rows_path(entry.lid)):
            path.unlink(missing_ok=True)


def read_entry(path: Path) -> Entry | None:
    try:
        if path.stat().st_size > MAX_ENTRY_BYTES:
            return None
        doc = json.loads(path.read_bytes())
        return Entry.from_json(doc) if isinstance(doc, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def in_flight_keys(ledger: Ledger) -> KeySet:
    """The keys of every row a batch in flight will answer (8 bytes each): not
    pending, whatever OUT holds yet."""
    keys = KeySet()
    for entry in ledger.open_entries():
        path = ledger.rows_path(entry.lid)
        try:
            with path.open("rb") as f:
                for line in f:
                    keys.add(int(json.loads(line)["key"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable rows file: its results cannot be matched anyway
    return keys
