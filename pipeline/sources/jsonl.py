"""JSON lines: one object per line, ``{"image": "a.jpg", "id": "a", "tag": "cat"}``.

The columns are the union of the keys of the first records (at most ``SCAN_LINES``
lines or ``SCAN_BYTES``, so the scan is bounded); a key first seen later is not
carried (one warning names it). Values that are not strings are carried as JSON text.
The image and id fields are ``--image-column`` / ``--id-column`` (``image``, ``id``);
without an id the id is derived from the image, as for CSV. A line that is not JSON,
not an object, or has no image string is an error row naming its line; lines are read
one at a time with the CSV reader's 1 MiB cap, so memory stays flat.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import IO, Any

from ..records import ManifestRow
from . import location
from .base import Wanted, carried, count_lines, fatal, text_value
from .manifest import Line, _numbered_lines, _too_long, derive_id, image_ref_problem
from .manifest_format import ManifestFormat, is_stdin, is_stream

__all__ = ["JsonLines"]

log = logging.getLogger("pipeline")

SCAN_LINES, SCAN_BYTES = 1000, 4 << 20
_MAX_UNKNOWN_WARNINGS = 5


class JsonLines:
    kind = "jsonl"
    block_rows = 4096

    def __init__(self, path: Path | str, fmt: ManifestFormat | None = None) -> None:
        self.path = path
        self.fmt = fmt or ManifestFormat()
        self._one_shot = is_stream(path) if not location.is_url(path) else False
        self._stream: IO[bytes] | None = None
        self._scanned: list[Line] = []
        try:
            self.columns = self._scan()
        except BaseException:
            self.close()
            raise
        core = {self.fmt.image_column, self.fmt.id_column, "prompt"}
        self._extras = carried(path, self.columns, core)
        self.extra_columns = [name for _, name in self._extras]
        self._known = set(self.columns)
        self._warned: set[str] = set()

    @property
    def one_shot(self) -> bool:
        return self._one_shot

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def estimate(self) -> int | None:
        if self._one_shot:
            return None
        return count_lines(self.path)

    def _open(self) -> IO[bytes]:
        if is_stdin(self.path):
            from .manifest import _open_stream

            return _open_stream(Path(str(self.path)))
        try:
            return location.open_binary(self.path)
        except FileNotFoundError:
            raise fatal(self.path, "file not found") from None
        except IsADirectoryError:
            raise fatal(self.path, "is a directory, not a JSON lines file") from None
        except OSError as e:
            raise fatal(self.path, f"cannot be read ({e.strerror or e})") from None

    def _scan(self) -> list[str]:
        f = self._open()
        names: dict[str, None] = {}
        size = 0
        try:
            for lineno, raw in _numbered_lines(f):
                if self._one_shot:
                    self._scanned.append((lineno, raw))  # replayed: a stream is read once
                size += len(raw)
                obj = _object(raw)
                if obj is not None:
                    names.update(dict.fromkeys(obj))
                if lineno >= SCAN_LINES or size >= SCAN_BYTES:
                    break
        finally:
            if self._one_shot:
                self._stream = f
            else:
                f.close()
        if not size:
            raise fatal(self.path, "is empty (expected one JSON object per line)")
        if self.fmt.image_column not in names:
            found = ", ".join(repr(n) for n in list(names)[:8]) or "no JSON objects"
            raise fatal(self.path, f"no {self.fmt.image_column!r} field in the first "
                                   f"records (found {found}); name the field with "
                                   "--image-column")
        return list(names)

    def __iter__(self) -> Iterator[ManifestRow]:
        return self.rows()

    def rows(self, wanted: Wanted | None = None) -> Iterator[ManifestRow]:
        if self._one_shot:
            f, self._stream = self._stream, None
            if f is None:
                raise RuntimeError(f"manifest {self.path}: a stream can be read only once")
            last = self._scanned[-1][0] if self._scanned else 0
            lines: Iterator[Line] = chain(self._scanned, _numbered_lines(f, start=last))
            self._scanned = []
        else:
            f = self._open()
            lines = _numbered_lines(f)
        with f:
            for lineno, raw in lines:
                if raw.strip():
                    yield self._row(lineno, raw)

    def _row(self, line: int, raw: bytes) -> ManifestRow:
        if _too_long(raw):
            return self._bad(line, "line longer than 1 MiB")
        try:
            obj = json.loads(raw)
        except ValueError as e:
            return self._bad(line, f"not JSON ({_short(e)})")
        if not isinstance(obj, dict):
            return self._bad(line, f"a JSON {type(obj).__name__}, not an object")
        image = obj.get(self.fmt.image_column)
        rid = _id_text(obj.get(self.fmt.id_column))
        if not isinstance(image, str):
            what = "missing" if image is None else f"a {type(image).__name__}, not a string"
            return self._bad(line, f"the {self.fmt.image_column!r} field is {what}", rid)
        image = image.strip()
        prompt = obj.get("prompt")
        prompt = prompt.strip() or None if isinstance(prompt, str) else None
        self._note_unknown(obj, line)
        extra = {name: text_value(obj.get(col)) for col, name in self._extras}
        return ManifestRow(rid or (derive_id(image) if image else f"line-{line}"), image,
                           prompt, line, extra, error=image_ref_problem(image))

    def _bad(self, line: int, problem: str, rid: str | None = None) -> ManifestRow:
        return ManifestRow(rid or f"line-{line}", "", None, line,
                           {c: None for c in self.extra_columns},
                           error=f"manifest line {line}: {problem}")

    def _note_unknown(self, obj: dict[str, Any], line: int) -> None:
        if len(self._warned) >= _MAX_UNKNOWN_WARNINGS:
            return
        for key in obj:
            if key not in self._known and key not in self._warned:
                self._warned.add(key)
                log.warning("manifest %s line %d: field %r was not in the first records, "
                            "so it is not carried into OUT", location.display(self.path),
                            line, key)


def _object(raw: bytes) -> dict[str, Any] | None:
    if _too_long(raw) or not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _id_text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:120]
