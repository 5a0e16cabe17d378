"""Stream the manifest CSV one record at a time, turning each into a ``ManifestRow``.

Memory stays flat whatever the manifest size: the file is read line by line and
nothing is kept but the current record. A bad line never stops the run: it becomes a
row with ``error`` set (and its line number), which the worker records as an error
row. Only a manifest that cannot be read at all (missing, not CSV, no ``image``
column) is a ``RunFatal`` with exit code 2.
"""

from __future__ import annotations

import csv
import hashlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import RunFatal
from .records import BASE_NAMES, ManifestRow

__all__ = ["Manifest", "derive_id"]

_MAX_RECORD_LINES = 50  # a quoted field may span lines, but an unclosed quote must not eat the file
_SCHEMES_OK = ("http://", "https://")


def derive_id(image: str) -> str:
    """A stable id for manifests without an ``id`` column: same image value, same id."""
    return "img-" + hashlib.sha1(image.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _fatal(path: Path, problem: str) -> RunFatal:
    return RunFatal(f"manifest {path}: {problem}", "manifest", exit_code=2)


class Manifest:
    """A manifest file: its header, validated at construction, and a row iterator."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns = self._read_header()
        self.has_id = "id" in self.columns
        self.extra_columns = [self._extra_name(c) for c in self.columns
                              if c not in ("id", "image", "prompt")]

    @staticmethod
    def _extra_name(col: str) -> str:
        # A manifest column named like an output column must not overwrite it.
        return f"manifest_{col}" if col in BASE_NAMES else col

    def _read_header(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                first = f.readline(1 << 20)
        except FileNotFoundError:
            raise _fatal(self.path, "file not found") from None
        except IsADirectoryError:
            raise _fatal(self.path, "is a directory, not a CSV file") from None
        except OSError as e:
            raise _fatal(self.path, f"cannot be read ({e.strerror})") from None
        if not first.strip():
            raise _fatal(self.path, "is empty (expected a CSV header with an 'image' column)")
        try:
            text = first.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise _fatal(self.path, "line 1: not a UTF-8 CSV file") from None
        try:
            cols = [c.strip() for c in next(csv.reader([text], strict=True))]
        except (csv.Error, StopIteration) as e:
            raise _fatal(self.path, f"line 1: not a CSV header ({e})") from None
        if "image" not in cols:
            found = ", ".join(repr(c) for c in cols[:8])
            raise _fatal(self.path, f"no 'image' column in the header (found {found})")
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise _fatal(self.path, f"line 1: duplicate column names {dup}")
        return cols

    def __iter__(self) -> Iterator[ManifestRow]:
        with self.path.open("rb") as f:
            f.readline(1 << 20)  # header
            yield from self._records(f)

    def _records(self, f: BinaryIO) -> Iterator[ManifestRow]:
        """Group physical lines into CSV records; an unclosed quote costs one line only."""
        pending: deque[tuple[int, bytes]] = deque()
        lineno = 1
        source = iter(f)
        while True:
            if not pending:
                raw = next(source, None)
                if raw is None:
                    return
                lineno += 1
                pending.append((lineno, raw))
            start, _ = pending[0]
            while pending_quotes_open(pending) and len(pending) < _MAX_RECORD_LINES:
                raw = next(source, None)
                if raw is None:
                    break
                lineno += 1
                pending.append((lineno, raw))
            if pending_quotes_open(pending):
                _, first = pending.popleft()  # the following lines are re-read as records
                row = self._bad(start, "unterminated quote", first)
            else:
                data = b"".join(raw for _, raw in pending)
                pending.clear()
                row = self._parse(start, data)
            if row is not None:
                yield row

    def _parse(self, line: int, data: bytes) -> ManifestRow | None:
        if not data.strip():
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad(line, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                                   f"column {e.start + 1})", data)
        try:
            fields = next(csv.reader([text], strict=True))
        except (csv.Error, StopIteration) as e:
            return self._bad(line, f"malformed CSV ({e})", data)
        if len(fields) != len(self.columns):
            return self._bad(line, f"expected {len(self.columns)} fields, found {len(fields)}",
                             data)
        return self._row(line, dict(zip(self.columns, fields)))

    def _row(self, line: int, rec: dict[str, str]) -> ManifestRow:
        image = rec["image"].strip()
        rid = rec.get("id", "").strip() if self.has_id else ""
        prompt = (rec.get("prompt") or "").strip() or None
        extra: dict[str, str | None] = {self._extra_name(c): rec[c] for c in self.columns
                                        if c not in ("id", "image", "prompt")}
        error = image_ref_problem(image)
        if not rid:
            rid = derive_id(image) if image else f"line-{line}"
        return ManifestRow(rid, image, prompt, line, extra, error=error)

    def _bad(self, line: int, problem: str, data: bytes) -> ManifestRow:
        """A row for an unusable line; keep its id when a lenient parse can find one."""
        rid = ""
        if self.has_id and data:
            text = data.decode("utf-8", "replace")
            fields = next(csv.reader([text]), [])
            if len(fields) == len(self.columns):
                rid = fields[self.columns.index("id")].strip()
        extra: dict[str, str | None] = {c: None for c in self.extra_columns}
        return ManifestRow(rid or f"line-{line}", "", None, line, extra,
                           error=f"manifest line {line}: {problem}")


def pending_quotes_open(pending: deque[tuple[int, bytes]]) -> bool:
    """True while the record's double quotes are unbalanced (a quoted field goes on)."""
    return sum(raw.count(b'"') for _, raw in pending) % 2 == 1


def image_ref_problem(image: str) -> str | None:
    if not image:
        return "empty image cell"
    if "://" in image[:16] and not image.lower().startswith(_SCHEMES_OK):
        scheme = image.split("://", 1)[0]
        return f"unsupported URL scheme {scheme!r} (only http:// and https:// are fetched)"
    return None
