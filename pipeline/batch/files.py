"""Request files: the split planner's output, written line by line, never held whole.

A ``RequestFile`` takes request lines until the next one would pass a cap: requests
per file, bytes (``--batch-max-bytes``, the provider's limit by default) or estimated
tokens (``--batch-max-tokens``, an enqueued-token budget). Beside every request it
writes the row it answers (``rows``: id, prompt name, image, line, extra columns, the
image's columns, the key hash), and rows that copy an identical image of the same file
(``copy_of``), so a result, read back in any order, becomes the same row the online
lane writes. ``custom_id`` is ``<entry id>-<row index>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..records import ManifestRow

__all__ = ["Caps", "RequestFile", "custom_id", "index_of", "row_record", "split_file"]

# Bytes a file may hold beyond its lines: Anthropic's ``{"requests": [...]}`` wrapper and
# the commas between lines; OpenAI's multipart envelope. Kept under the cap with them.
ENVELOPE_BYTES = 1024


@dataclass(frozen=True)
class Caps:
    requests: int
    bytes: int
    tokens: int | None = None

    def fits(self, requests: int, size: int, tokens: int) -> bool:
        return (requests <= self.requests and size + requests + ENVELOPE_BYTES <= self.bytes
                and (self.tokens is None or tokens <= self.tokens))


def custom_id(lid: str, index: int) -> str:
    return f"{lid}-{index}"


def index_of(lid: str, cid: Any) -> int | None:
    """The row index a custom_id names, or None when it is not one of this entry's."""
    if not isinstance(cid, str) or not cid.startswith(lid + "-"):
        return None
    tail = cid[len(lid) + 1:]
    return int(tail) if tail.isdigit() and len(tail) < 10 else None


def row_record(row: ManifestRow, columns: dict[str, Any], key: int,
               copy_of: int | None = None) -> dict[str, Any]:
    return {"id": row.id, "prompt_name": row.prompt_name, "image": row.image,
            "line": row.line, "extra": dict(row.extra), "columns": columns, "key": key,
            "copy_of": copy_of}


def _fsync_close(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


class RequestFile:
    """One request file and its rows file, being written."""

    def __init__(self, lid: str, requests_path: Path, rows_path: Path, caps: Caps) -> None:
        self.lid = lid
        self.caps = caps
        self.requests_path = requests_path
        self._req = requests_path.open("wb")
        self._rows = rows_path.open("wb")
        self.sha = hashlib.sha256()
        self.requests = 0
        self.rows = 0
        self.bytes = 0
        self.tokens = 0
        self.cost = 0.0

    def fits(self, line: bytes, tokens: int) -> bool:
        return self.caps.fits(self.requests + 1, self.bytes + len(line), self.tokens + tokens)

    def next_id(self) -> str:
        return custom_id(self.lid, self.rows)

    def add(self, line: bytes, record: dict[str, Any], tokens: int, cost: float) -> int:
        """The request line (built with ``next_id()``) and its row; returns the index."""
        self._req.write(line)
        self.sha.update(line)
        self.requests += 1
        self.bytes += len(line)
        self.tokens += tokens
        self.cost += cost
        return self._row(record)

    def add_copy(self, record: dict[str, Any]) -> int:
        return self._row(record)

    def _row(self, record: dict[str, Any]) -> int:
        self._rows.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self.rows += 1
        return self.rows - 1

    def seal(self) -> str:
        """Durable on disk; returns the request file's sha256."""
        _fsync_close(self._req)
        _fsync_close(self._rows)
        return self.sha.hexdigest()

    def abandon(self) -> None:
        for f in (self._req, self._rows):
            f.close()


def split_file(requests: Path, rows: Path, old_lid: str, halves: list[RequestFile]
               ) -> None:
    """Copy an entry's requests and rows into two new files (new custom_ids), the first
    half of its requests into ``halves[0]``; a copy row follows its original."""
    with requests.open("rb") as f:
        total = sum(1 for _ in f)
    placed: dict[int, tuple[int, int]] = {}  # old row index → (half, new index)
    seen = 0
    with requests.open("rb") as req, rows.open("rb") as rws:
        lines = iter(req)
        for old, raw in enumerate(rws):
            record = json.loads(raw)
            if record.get("copy_of") is not None:
                half, orig = placed[record["copy_of"]]
                record["copy_of"] = orig
                placed[old] = (half, halves[half].add_copy(record))
                continue
            doc = json.loads(next(lines))
            half = 0 if seen < (total + 1) // 2 else 1
            seen += 1
            target = halves[half]
            doc["custom_id"] = target.next_id()
            line = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            placed[old] = (half, target.add(line, record, 0, 0.0))
