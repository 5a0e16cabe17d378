"""What every source is: rows with a stable id, an image (reference or embedded bytes),
and extra columns, streamed.

A source (CSV/TSV manifest, JSONL, Parquet, a folder, WebDataset shards) is an object
with the attributes and methods of ``Source``. The planner (``plan.Plan``) is the one
consumer: it asks for ``rows(wanted)``, where ``wanted(id)`` says whether the id still
has a pending key, so a source can skip the expensive part of a finished record
(reading an embedded image, sniffing a file) and yield its id and reference only.

Provenance: every row says where it came from. ``line`` is the position inside its
file (a CSV or JSONL line, a Parquet row, a sample of a shard, the n-th image found in
a folder), and the sources that read several files add the columns ``source_file`` (the
Parquet file or shard) and, for WebDataset, ``source_member`` (the image member's name).
A broken record becomes a row with ``error`` set that names the file and position.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ..errors import RunFatal
from ..records import BASE_NAMES, ManifestRow

__all__ = ["SOURCE_FILE", "SOURCE_MEMBER", "Reopenable", "Source", "Wanted", "carried",
           "count_lines",
           "fatal", "text_value"]

SOURCE_FILE, SOURCE_MEMBER = "source_file", "source_member"
MAX_TEXT = 1 << 20  # one carried value at most (a longer one is cut, with a marker)

Wanted = Callable[[str], bool]  # id -> True while the id has a key still to caption


class Source(Protocol):
    path: Path | str            # what the user named (a file, folder, URL or pattern)
    kind: str                   # csv, jsonl, parquet, folder, webdataset
    columns: list[str]          # what a prompt template may name (besides id, image)
    extra_columns: list[str]    # the output columns the rows carry in ``extra``
    block_rows: int             # rows the planner takes at once (small when they hold images)

    @property
    def one_shot(self) -> bool: ...

    def rows(self, wanted: Wanted | None = None) -> Iterator[ManifestRow]: ...

    def __iter__(self) -> Iterator[ManifestRow]: ...

    def estimate(self) -> int | None: ...

    def close(self) -> None: ...


class Reopenable:
    """What a source that reads files it can open again (not a pipe) shares: it may be
    read more than once, and holds nothing open between reads."""

    @property
    def one_shot(self) -> bool:
        return False

    def close(self) -> None:
        pass


def fatal(path: Path | str, problem: str) -> RunFatal:
    from .location import display

    return RunFatal(f"manifest {display(path)}: {problem}", "manifest", exit_code=2)


def carried(path: Path | str, columns: Iterable[str], core: set[str],
            reserved: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(source column, output column) for every column carried into OUT: a name that
    is an output column (or a provenance column this source adds) gets ``manifest_``
    in front; a clash that renaming would create is exit 2, as for CSV manifests."""
    taken = set(BASE_NAMES) | set(reserved)
    owner: dict[str, str] = {}
    for col in columns:
        if col in core:
            continue
        name = f"manifest_{col}" if col in taken else col
        if name in owner:
            raise fatal(path, f"column {col!r} would be stored as {name!r}, which another "
                              "column already is; rename one of them")
        owner[name] = col
    return [(col, name) for name, col in owner.items()]


def text_value(value: Any) -> str | None:
    """A carried value as text (OUT's extra columns are strings): strings as they are,
    numbers and lists as JSON; never bytes (an embedded image must not reach OUT)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, bytes | bytearray | memoryview):
        return None
    elif isinstance(value, bool | int | float):
        text = json.dumps(value)
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…[cut]"


def count_lines(path: Path | str) -> int | None:
    """Physical lines, for the progress estimate (1 GB/s locally; no parsing). None
    when the file cannot be read now: the reader says why when it gets there."""
    from .location import open_binary

    n = 0
    try:
        with open_binary(path, block_size=8 << 20) as f:
            while block := f.read(1 << 20):
                n += block.count(b"\n")
    except OSError:
        return None
    return n
