"""How a manifest is laid out, and where it comes from: the header and its mistakes.

* The field separator is ``,`` unless the header says otherwise: ``;`` (what a
  spreadsheet in many locales saves), tab and ``|`` are recognised from the header
  line, or set with ``--delimiter``.
* The image and id columns are ``image`` and ``id`` unless ``--image-column`` /
  ``--id-column`` name others. A missing image column is reported with the columns
  that look like image references and the option that uses them.
* ``-`` (or ``/dev/stdin``) is standard input; it, a FIFO and a process substitution
  can be read only once, so the manifest is streamed from one open handle.
"""

from __future__ import annotations

import csv
import difflib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import RunFatal

__all__ = ["DELIMITERS", "SOURCE_KINDS", "ManifestFormat", "base_dir", "column_problem", "is_stdin",
           "is_stream", "sniff_delimiter"]

DELIMITERS = (",", ";", "\t", "|")
STDIN_NAMES = frozenset({"-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"})
_DELIMITER_WORDS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
_IMAGE_WORDS = ("image", "img", "photo", "picture", "pic", "path", "file", "url", "uri",
                "src")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
                     ".heic", ".heif", ".avif")


def _bad(message: str) -> RunFatal:
    return RunFatal(message, "config", exit_code=2)


SOURCE_KINDS = ("csv", "tsv", "jsonl", "parquet", "folder", "webdataset")


@dataclass(frozen=True)
class ManifestFormat:
    delimiter: str | None = None  # None: detected from the header line
    image_column: str = "image"
    id_column: str = "id"
    kind: str | None = None       # --format; None: from the input's form (sources.choose)

    @classmethod
    def parse(cls, delimiter: str | None, image_column: str, id_column: str,
              kind: str | None = None) -> ManifestFormat:
        """From the command line's words; a value that cannot work is exit 2, one line."""
        if kind is not None and kind not in SOURCE_KINDS:
            raise _bad(f"--format must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
        if delimiter is not None:
            delimiter = _DELIMITER_WORDS.get(delimiter.lower(), delimiter)
            if len(delimiter) != 1 or delimiter in "\"\r\n":
                raise _bad(f"--delimiter wants one character such as ';' or 'tab', got "
                           f"{delimiter!r}")
        image_column, id_column = image_column.strip(), id_column.strip()
        if not image_column or not id_column:
            raise _bad("--image-column and --id-column want a column name")
        if image_column == id_column:
            raise _bad(f"--image-column and --id-column both name {image_column!r}; the id "
                       "column must be another one (or leave --id-column out)")
        return cls(delimiter, image_column, id_column, kind)


def is_stdin(path: Path | str) -> bool:
    return str(path) in STDIN_NAMES


def is_stream(path: Path | str) -> bool:
    """Input that can be read only once: standard input, a FIFO, ``<(...)``."""
    if is_stdin(path):
        return True
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False  # missing: the manifest reader says so
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def base_dir(path: Path) -> Path:
    """The folder relative image paths resolve against: the manifest's own, or the
    current folder for standard input and descriptors such as ``<(...)``'s /dev/fd/63,
    whose folder means nothing to the user."""
    if is_stdin(path) or str(path).startswith(("/dev/", "/proc/")):
        return Path.cwd()
    return path.parent


def _fields(text: str, delimiter: str) -> list[str]:
    try:
        return [c.strip() for c in next(csv.reader([text], delimiter=delimiter), [])]
    except csv.Error:
        return []


def sniff_delimiter(header: str, image_column: str = "image") -> str:
    """The separator that splits the header best: one that yields the image column
    first, then the most fields; ``,`` when nothing splits it."""
    def score(d: str) -> tuple[bool, int, int]:
        cols = _fields(header, d)
        return image_column in cols, len(cols), -DELIMITERS.index(d)

    best = max(DELIMITERS, key=score)
    return best if len(_fields(header, best)) > 1 or image_column in _fields(header, best) \
        else ","


def _quoted(names: list[str], most: int = 8) -> str:
    more = f", ... ({len(names)} columns)" if len(names) > most else ""
    return ", ".join(repr(c) for c in names[:most]) + more


def _looks_like_image(column: str, value: str) -> bool:
    v = value.strip().lower()
    by_value = v.startswith(("http://", "https://")) or \
        v.split("?", 1)[0].endswith(_IMAGE_EXTENSIONS)
    return by_value or any(w in column.lower() for w in _IMAGE_WORDS)


def column_problem(cols: list[str], first_row: list[str], fmt: ManifestFormat,
                   delimiter: str, header: str) -> str | None:
    """Why the header cannot be used, with the fix; None when it can."""
    found = f"(found {_quoted(cols)})"
    if fmt.image_column not in cols:
        if fmt.image_column != "image":  # the user named it: a typo, most likely
            close = difflib.get_close_matches(fmt.image_column, cols, n=1)
            fix = f"; did you mean --image-column {close[0]}?" if close else ""
            return f"no column {fmt.image_column!r} (--image-column) in the header {found}{fix}"
        values = first_row + [""] * (len(cols) - len(first_row))
        likely = [c for c, v in zip(cols, values) if _looks_like_image(c, v)]
        other = [d for d in DELIMITERS if d != delimiter and len(_fields(header, d)) > 1]
        if len(cols) == 1 and other:
            return (f"no 'image' column in the header {found}; the header looks "
                    f"{other[0]!r}-separated: pass --delimiter {_shell(other[0])}")
        if len(likely) == 1:
            fix = f"{likely[0]!r} looks like image paths or URLs: pass --image-column " \
                  f"{_shell(likely[0])}"
        elif likely:
            fix = f"{_quoted(likely)} look like image references: pass --image-column " \
                  "with the one to caption"
        else:
            fix = "name the column of image paths or URLs 'image', or pass --image-column NAME"
        return f"no 'image' column in the header {found}; {fix}"
    if fmt.id_column != "id" and fmt.id_column not in cols:
        close = difflib.get_close_matches(fmt.id_column, cols, n=1)
        fix = f"; did you mean --id-column {close[0]}?" if close else ""
        return f"no column {fmt.id_column!r} (--id-column) in the header {found}{fix}"
    return None


def _shell(word: str) -> str:
    """A word as it would be typed in a shell."""
    if word == "\t":
        return "tab"
    return word if word.replace("_", "").replace("-", "").isalnum() else repr(word)
