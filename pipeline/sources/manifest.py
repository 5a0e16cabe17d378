"""Stream the manifest CSV one record at a time, turning each into a ``ManifestRow``.

Memory stays flat whatever the manifest size: the file is read line by line and
nothing is kept but the current record (plus at most ``_MAX_RECORD_LINES`` look-ahead
lines). A bad line never stops the run: it becomes a row with ``error`` set (and its
line number), which the worker records as an error row, and it costs that line only.
Only a manifest that cannot be read at all (missing, not CSV, no ``image`` column,
clashing column names) is a ``RunFatal`` with exit code 2. The separator and the names
of the image and id columns come from ``ManifestFormat`` (pipeline/manifest_format.py);
standard input, a FIFO or ``<(...)`` is read through one handle, once.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..errors import RunFatal
from ..records import BASE_NAMES, ManifestRow
from . import location
from .base import Wanted, count_lines
from .manifest_format import ManifestFormat, column_problem, is_stdin, is_stream, sniff_delimiter

__all__ = ["Manifest", "ManifestFormat", "derive_id"]

_MAX_RECORD_LINES = 50  # a quoted field may span lines, but an unclosed quote must not eat the file
_MAX_LINE_BYTES = 1 << 20  # a file without newlines must not be read whole into one "line"
_SCHEMES_OK = ("http://", "https://")

Line = tuple[int, bytes]  # (physical line number, raw bytes with their line ending)


def derive_id(image: str) -> str:
    """A stable id for manifests without an ``id`` column: same image value, same id."""
    return "img-" + hashlib.sha1(image.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _fatal(path: Path | str, problem: str) -> RunFatal:
    return RunFatal(f"manifest {location.display(path)}: {problem}", "manifest", exit_code=2)


class _BadLine(Exception):
    """Why a line is unusable; it becomes the error of that line's row."""


class Manifest:
    """A manifest: its header, validated at construction, and a row iterator.

    A file is opened again for the rows; a stream (standard input, a FIFO) keeps the
    handle the header was read from and can be iterated once.
    """

    kind = "csv"
    block_rows = 4096

    def __init__(self, path: Path | str, fmt: ManifestFormat | None = None) -> None:
        self.path = path
        self.fmt = fmt or ManifestFormat()
        self._one_shot = not location.is_url(path) and is_stream(path)
        self._stream: IO[bytes] | None = _open_stream(Path(str(path))) if self._one_shot \
            else None
        try:
            self.columns = self._read_header()
        except BaseException:
            self.close()
            raise
        self.has_id = self.fmt.id_column in self.columns
        self._extras = self._extra_names()  # (manifest column, output column) pairs
        self.extra_columns = [name for _, name in self._extras]
        # Field positions, so a record is read without building a dict per line (a
        # million-row resume parses every line before it reaches the pending ones).
        where = {c: i for i, c in enumerate(self.columns)}
        self._i_image = where[self.fmt.image_column]
        self._i_id = where.get(self.fmt.id_column)
        self._i_prompt = where.get("prompt")
        self._i_extras = [(where[col], name) for col, name in self._extras]

    @property
    def one_shot(self) -> bool:
        """True when the rows can be read only once (standard input, a FIFO)."""
        return self._one_shot

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def estimate(self) -> int | None:
        """Records, for the progress bar (lines less the header); None for a stream."""
        if self._one_shot:
            return None
        lines = count_lines(self.path)
        return None if lines is None else max(0, lines - 1)

    def _extra_names(self) -> list[tuple[str, str]]:
        # A manifest column named like an output column must not overwrite it, so it is
        # renamed; the new name must not land on another manifest column either, or one
        # value would silently replace the other in every row.
        owner: dict[str, str] = {}
        core = {self.fmt.image_column, self.fmt.id_column, "prompt"}
        for col in self.columns:
            if col in core:
                continue
            name = f"manifest_{col}" if col in BASE_NAMES else col
            if name in owner:
                renamed = col if name != col else owner[name]
                raise _fatal(self.path, f"line 1: column {renamed!r} is an output column name, so "
                                        f"it is stored as {name!r}, which clashes with the "
                                        f"manifest's own {name!r} column; rename one of them")
            owner[name] = col
        return [(col, name) for name, col in owner.items()]

    def _read_header(self) -> list[str]:
        if self._stream is not None:
            return self._parse_header(self._stream)
        try:
            with location.open_binary(self.path) as f:
                return self._parse_header(f)
        except FileNotFoundError:
            raise _fatal(self.path, "file not found") from None
        except IsADirectoryError:
            raise _fatal(self.path, "is a directory, not a CSV file") from None
        except OSError as e:
            raise _fatal(self.path, f"cannot be read ({e.strerror or e})") from None

    def _parse_header(self, f: IO[bytes]) -> list[str]:
        first = f.readline(_MAX_LINE_BYTES)
        if not first.strip():
            raise _fatal(self.path, "is empty (expected a CSV header with an 'image' column)")
        if _too_long(first):
            raise _fatal(self.path, "line 1: longer than 1 MiB, not a CSV header")
        try:
            text = first.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise _fatal(self.path, "line 1: not a UTF-8 CSV file") from None
        self.delimiter = self.fmt.delimiter or sniff_delimiter(text, self.fmt.image_column)
        try:
            cols = [c.strip() for c in next(csv.reader([text], delimiter=self.delimiter,
                                                       strict=True))]
        except (csv.Error, StopIteration) as e:
            raise _fatal(self.path, f"line 1: not a CSV header ({e})") from None
        if self.fmt.image_column not in cols or (self.fmt.id_column != "id"
                                                 and self.fmt.id_column not in cols):
            # Only now (the run cannot go on) is a second line read, for the hint.
            second = f.readline(_MAX_LINE_BYTES).decode("utf-8", "replace")
            problem = column_problem(cols, _lenient_fields(second, self.delimiter),
                                     self.fmt, self.delimiter, text)
            raise _fatal(self.path, problem or "unusable header")
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise _fatal(self.path, f"line 1: duplicate column names {dup}")
        return cols

    def rows(self, wanted: Wanted | None = None) -> Iterator[ManifestRow]:
        """The rows; ``wanted`` is not needed: a CSV row costs the same either way."""
        return iter(self)

    def __iter__(self) -> Iterator[ManifestRow]:
        if self._one_shot:
            f, self._stream = self._stream, None  # one pass: a stream cannot be reread
            if f is None or f.closed:
                raise RuntimeError(f"manifest {self.path}: a stream can be read only once")
            rows = self._rows(_numbered_lines(f, start=1))  # the header was line 1
        else:
            f = location.open_binary(self.path)
            lines = _numbered_lines(f)
            next(lines, None)  # the header, validated at construction
            rows = self._rows(lines)
        with f:
            yield from rows

    def _rows(self, lines: Iterator[Line]) -> Iterator[ManifestRow]:
        # Lines read ahead by a failed multi-line join; they are re-read as records.
        ahead: deque[Line] = deque()
        while (item := ahead.popleft() if ahead else next(lines, None)) is not None:
            row = self._record(item, ahead, lines)
            if row is not None:
                yield row

    def _record(self, item: Line, ahead: deque[Line], lines: Iterator[Line]) -> ManifestRow | None:
        lineno, raw = item
        if not raw.strip():
            return None
        try:
            text = _decode(raw)
            fields = _split(text, self.delimiter)
            if fields is None:  # a quoted field is still open: it may end on a later line
                fields = self._join(text, ahead, lines)
            elif len(fields) != len(self.columns):
                raise _BadLine(f"expected {len(self.columns)} fields, found {len(fields)}")
        except _BadLine as e:
            return self._bad(lineno, str(e), raw)
        return self._row(lineno, fields)

    def _join(self, text: str, ahead: deque[Line], lines: Iterator[Line]) -> list[str]:
        """Fields of the record begun by ``text`` and completed by the next lines.

        Accepted only when the joined lines parse strictly as ONE record with the right
        field count; otherwise the first line alone is bad and the look-ahead lines stay
        in ``ahead`` to be read as records of their own (a stray quote costs one line).
        """
        parts = [text]
        for i in range(_MAX_RECORD_LINES - 1):
            if i == len(ahead) and not _read_one(ahead, lines):
                break
            try:
                parts.append(_decode(ahead[i][1]))
                fields = _split("".join(parts), self.delimiter)
            except _BadLine:
                break  # an error before the end of the text: more lines cannot fix it
            if fields is None:
                continue
            if len(fields) != len(self.columns):
                break
            for _ in range(i + 1):
                ahead.popleft()
            return fields
        raise _BadLine(f"unclosed quote (no valid record ends within {_MAX_RECORD_LINES} lines)")

    def _row(self, line: int, fields: list[str]) -> ManifestRow:
        image = fields[self._i_image].strip()
        rid = fields[self._i_id].strip() if self._i_id is not None else ""
        prompt = fields[self._i_prompt].strip() or None if self._i_prompt is not None else None
        extra: dict[str, str | None] = {name: fields[i] for i, name in self._i_extras}
        error = image_ref_problem(image)
        if not rid:
            rid = derive_id(image) if image else f"line-{line}"
        return ManifestRow(rid, image, prompt, line, extra, error=error)

    def _bad(self, line: int, problem: str, raw: bytes) -> ManifestRow:
        """A row for an unusable line; keep its id when a lenient parse can find one."""
        rid = self._lenient_id(raw) if self.has_id else ""
        extra: dict[str, str | None] = {c: None for c in self.extra_columns}
        return ManifestRow(rid or f"line-{line}", "", None, line, extra,
                           error=f"manifest line {line}: {problem}")

    def _lenient_id(self, raw: bytes) -> str:
        # Best effort only, so it must never raise: this line already failed the strict parse.
        fields = _lenient_fields(raw.decode("utf-8", "replace"), self.delimiter)
        if len(fields) != len(self.columns):
            return ""
        return fields[self.columns.index(self.fmt.id_column)].strip()


def _lenient_fields(text: str, delimiter: str) -> list[str]:
    """Fields of one line parsed leniently; never raises (for hints and ids of bad lines)."""
    text = text.rstrip("\r\n").replace("\r", " ")
    try:
        return next(csv.reader([text], delimiter=delimiter), [])
    except csv.Error:
        return []


def _open_stream(path: Path) -> IO[bytes]:
    """One handle for input that can be read once; standard input is duplicated, so
    closing the manifest leaves fd 0 to the process."""
    if not is_stdin(path):
        try:
            return path.open("rb")
        except OSError as e:
            raise _fatal(path, f"cannot be read ({e.strerror})") from None
    if sys.stdin is None or sys.stdin.closed:
        raise _fatal(path, "standard input is closed: pipe the CSV in (cat m.csv | ...)")
    try:
        fd = sys.stdin.fileno()
        if os.isatty(fd):
            raise _fatal(path, "standard input is a terminal: pipe the CSV in "
                               "(cat m.csv | python -m pipeline caption - ...)")
        return os.fdopen(os.dup(fd), "rb")
    except (OSError, ValueError) as e:
        raise _fatal(path, f"standard input cannot be read ({e})") from None


def _numbered_lines(f: IO[bytes], start: int = 0) -> Iterator[Line]:
    """Physical lines, numbered from ``start`` + 1; an over-long line is cut (``_decode``
    rejects it)."""
    lineno = start
    while raw := f.readline(_MAX_LINE_BYTES):
        lineno += 1
        if _too_long(raw):
            while (rest := f.readline(_MAX_LINE_BYTES)) and _too_long(rest):
                pass  # skip the rest of the line without holding it
        yield lineno, raw


def _read_one(ahead: deque[Line], lines: Iterator[Line]) -> bool:
    item = next(lines, None)
    if item is not None:
        ahead.append(item)
    return item is not None


def _too_long(raw: bytes) -> bool:
    return len(raw) >= _MAX_LINE_BYTES and not raw.endswith(b"\n")


def _decode(raw: bytes) -> str:
    if _too_long(raw):
        raise _BadLine(f"line longer than {_MAX_LINE_BYTES >> 20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadLine(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                       ) from None


def _split(text: str, delimiter: str = ",") -> list[str] | None:
    """The fields of ``text`` parsed strictly as one record; None if a quoted field is open.

    The reader asks for another line only when the text ends inside a quoted field, so
    that request (not the wording of csv's error) tells "open" from "malformed".
    """
    if '"' not in text and "\r" not in text.rstrip("\r\n"):
        return text.rstrip("\r\n").split(delimiter)  # what csv would give, 10x faster
    wanted_more = False

    def source() -> Iterator[str]:
        nonlocal wanted_more
        yield text
        wanted_more = True

    try:
        return next(csv.reader(source(), delimiter=delimiter, strict=True))
    except csv.Error as e:
        if wanted_more:
            return None
        if "\r" in text.rstrip("\r\n"):  # csv's own message blames the file's open mode
            raise _BadLine("malformed CSV (stray carriage return inside a field)") from None
        raise _BadLine(f"malformed CSV ({e})") from None


def image_ref_problem(image: str) -> str | None:
    if not image:
        return "empty image cell"
    if ":" not in image[:40]:  # a plain path (most rows): no scheme to check
        return None
    scheme = location.scheme(image[:40])
    if scheme is not None and not image.lower().startswith(_SCHEMES_OK) \
            and scheme not in location.IMAGE_SCHEMES:
        return (f"unsupported URL scheme {scheme!r} (http(s)://, and through fsspec "
                f"{', '.join(s + '://' for s in sorted(location.IMAGE_SCHEMES))})")
    return None
