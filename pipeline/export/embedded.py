"""Image bytes that live inside the source, not beside it: a Parquet image struct
(``{bytes, path}``, Hugging Face's) or a WebDataset shard member.

OUT never holds those bytes (docs/protocol.md §13); its rows say where they came from
(``source_file`` and ``line``, the 1-based row, or ``source_member`` for a shard), so an
export that needs the image reads it from there again. Rows come in source order, so
one cached Parquet row group and one shard's member index at a time are enough.
"""

from __future__ import annotations

import os
import stat
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from ..sources import tarstream

__all__ = ["Embedded", "EMBEDDED_COLUMNS"]

EMBEDDED_COLUMNS = ("source_file", "line", "source_member")


@dataclass(frozen=True, slots=True)
class Found:
    data: bytes | None  # None: the record is there but holds no usable image
    rel: str            # where the image goes under DEST
    why: str = ""       # why ``data`` is None


class Embedded:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._pq: tuple[str, pq.ParquetFile, list[int], str] | None = None
        self._group: tuple[int, list[Any]] | None = None
        self._tar: tuple[str, BinaryIO, dict[str, tarstream.Member]] | None = None

    def close(self) -> None:
        if self._tar is not None:
            self._tar[1].close()
            self._tar = None

    def find(self, row: dict[str, Any]) -> Found | None:
        """The row's image from its source, or None when the row's image is a file or
        URL of its own (no source record to read)."""
        source, member, line = row.get("source_file"), row.get("source_member"), row.get("line")
        if not isinstance(source, str) or not source:
            return None
        stem = PurePosixPath(source).stem
        problem = _not_a_file(source)
        if problem:  # a FIFO would block the open for ever, a device never ends
            return Found(None, stem, problem)
        try:
            if isinstance(member, str) and member:
                return self._member(source, member, f"{stem}/{member}")
            if isinstance(line, int) and source.endswith(".parquet"):
                return self._cell(source, line, stem, row.get("image"))
        except (OSError, pa.ArrowException, tarstream.TarError) as e:
            return Found(None, stem, f"unreadable source records ({type(e).__name__})")
        return None

    def _member(self, source: str, member: str, rel: str) -> Found:
        if self._tar is None or self._tar[0] != source:
            self.close()
            handle: BinaryIO = open(source, "rb")  # noqa: SIM115 (kept for the shard)
            index = {m.name: m for m in tarstream.members(handle)}
            self._tar = (source, handle, index)
        _, f, index = self._tar
        m = index.get(member)
        if m is None:
            return Found(None, rel, "missing source records")
        if m.size > self.max_bytes:
            return Found(None, rel, f"images over {self.max_bytes >> 20} MiB")
        return Found(tarstream.read(f, m), rel)

    def _cell(self, source: str, line: int, stem: str, image: Any) -> Found | None:
        if self._pq is None or self._pq[0] != source:
            pf = pq.ParquetFile(source)
            starts, total = [], 0
            for i in range(pf.metadata.num_row_groups):
                starts.append(total)
                total += pf.metadata.row_group(i).num_rows
            column = _struct_column(pf.schema_arrow)
            self._pq, self._group = (source, pf, starts, column or ""), None
        _, pf, starts, column = self._pq
        name = os.path.basename(image) if isinstance(image, str) and image else "image"
        rel = f"{stem}/{line:08d}-{name}"
        if not column:  # a Parquet manifest of paths or URLs: the image is its own file
            return None
        index = line - 1
        group = bisect_right(starts, index) - 1
        if group < 0 or index >= starts[-1] + pf.metadata.row_group(group).num_rows:
            return Found(None, rel, "missing source records")
        if self._group is None or self._group[0] != group:
            cells = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
            self._group = (group, cells)
        cell = self._group[1][index - starts[group]]
        data = cell.get("bytes") if isinstance(cell, dict) else None
        if not isinstance(data, bytes) or not data:
            return Found(None, rel, "rows without an image")
        if len(data) > self.max_bytes:
            return Found(None, rel, f"images over {self.max_bytes >> 20} MiB")
        return Found(data, rel)


def _not_a_file(path: str) -> str:
    """Why ``path`` cannot be read as a source file ("" when it can)."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing source files"
    return "" if stat.S_ISREG(st.st_mode) else "source paths that are not regular files"


def _struct_column(schema: pa.Schema) -> str | None:
    """The column holding image structs (a ``bytes`` field of binary type)."""
    for f in schema:
        t = f.type
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            inner = t.field("bytes").type
            if pa.types.is_binary(inner) or pa.types.is_large_binary(inner):
                return str(f.name)
    return None
