"""An append-only journal of finished rows, so a kill costs only the rows in flight.

Rows wait in memory for the next Parquet part (``--flush-rows`` / ``--flush-seconds``);
without the journal a SIGKILL threw all of them away. Each finished row is appended
here at once, as one self-checking line::

    <crc32 of the JSON, 8 hex digits> <the row as JSON>\\n

The append is a plain ``write`` (the data is in the kernel's page cache, so it survives
the death of the process at once); an ``fsync`` every ``SYNC_SECONDS`` (group commit)
makes it survive a power loss too. When the sink takes its buffer for a part it
``rotate``s to a new segment; once that part is committed the old segment is
``discard``ed. At the next start ``recover`` reads what is left: a torn last line (a
crash mid-write) fails its checksum and is skipped. A row in both a part and a
segment (a crash between commit and discard) is reduced to one by the checkpoint's
repair. Parquet readers never look here (``_journal/`` starts with ``_``).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import zlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["Journal", "recover", "SYNC_SECONDS"]

SYNC_SECONDS = 0.2
_SUFFIX = ".jsonl"


def _default(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    return str(v)


def encode(row: dict[str, Any]) -> bytes:
    payload = json.dumps(row, ensure_ascii=False, default=_default,
                         separators=(",", ":")).encode("utf-8", "replace")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> dict[str, Any] | None:
    """The row of one journal line, or None when the line is torn or damaged."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        row = json.loads(payload)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


class Journal:
    """Segments ``<dir>/<run id>-<seq>.jsonl``; appends from one thread (the event loop),
    ``sync`` from any thread (it fsyncs duplicated descriptors, outside the lock)."""

    def __init__(self, directory: Path, run_id: str) -> None:
        self.dir = directory
        self.run_id = run_id
        self._seq = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._dirty = False              # the open segment has writes not yet fsynced
        self._closed: list[int] = []     # duplicates of rotated segments not yet fsynced
        self._lock = threading.Lock()    # guards the descriptors, never held over an fsync

    def _open(self) -> int:
        self.dir.mkdir(exist_ok=True)
        self._seq += 1
        path = self.dir / f"{self.run_id}-{self._seq:06d}{_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        with self._lock:
            self._fd, self._path = fd, path
        return fd

    def append(self, row: dict[str, Any]) -> None:
        """Write one row (raises OSError: the disk is full, gone or read-only)."""
        data = memoryview(encode(row))
        fd = self._fd if self._fd is not None else self._open()
        while data:
            data = data[os.write(fd, data):]
        self._dirty = True

    def rotate(self) -> Path | None:
        """Close the current segment (its rows are going into a part); returns its path."""
        with self._lock:
            fd, path = self._fd, self._path
            if fd is None:
                return None
            self._fd = self._path = None
            try:
                if self._dirty:
                    try:
                        self._closed.append(os.dup(fd))  # still owed an fsync
                    except OSError:  # no descriptor left for the duplicate: sync it now
                        os.fsync(fd)
            finally:
                self._dirty = False
                os.close(fd)
        return path

    def sync(self) -> None:
        """fsync every segment written since the last sync (group commit)."""
        with self._lock:
            fds, self._closed = self._closed, []
            if self._dirty and self._fd is not None:
                self._dirty = False  # a write after this point sets it again
                fds.append(os.dup(self._fd))
        try:
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def discard(path: Path | None) -> None:
        """A segment whose rows are committed in a part: no longer needed."""
        if path is not None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            for fd in [*self._closed, *([self._fd] if self._fd is not None else [])]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fd, self._closed = None, []


def segments(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.endswith(_SUFFIX))


def recover(path: Path, max_line: int = 64 << 20) -> Iterator[dict[str, Any]]:
    """The intact rows of one segment; damaged lines (a torn tail) are skipped."""
    with path.open("rb") as f:
        while line := f.readline(max_line):
            row = decode(line)
            if row is not None:
                yield row
