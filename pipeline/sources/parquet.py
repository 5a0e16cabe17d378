"""Parquet manifests: one file, or a folder of ``*.parquet`` files (Hugging Face layout).

The image column (``--image-column``, default ``image``) may hold:

* text: a path or URL, as in a CSV manifest;
* a Hugging Face ``Image`` struct ``{bytes, path}``: the bytes are the image (embedded,
  prepared from memory, never written to OUT); ``image`` in OUT is the struct's
  ``path``, or ``<file>#<row>`` when it has none; a struct with neither is an error row;
* plain binary: embedded bytes, named ``<file>#<row>``.

Without an id column the id is derived from that image value, as for CSV. Every other
column is carried as text (lists and numbers as JSON), except binary ones: no image
bytes reach OUT. ``line`` is the row's 1-based number in its file, ``source_file`` the
file. Reading is by row group: a group whose ids are all done is read for its ids and
image names only, not its bytes. Memory is one batch of rows (``_BATCH``; for embedded
images ``_BATCH_EMBEDDED``), plus whatever Arrow needs to decode one column chunk of a
row group (Hugging Face writes ~100 MiB groups).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..records import ManifestRow
from . import location
from .base import SOURCE_FILE, Reopenable, Wanted, carried, fatal, text_value
from .manifest import derive_id, image_ref_problem
from .manifest_format import ManifestFormat

__all__ = ["ParquetSource", "parquet_files"]

log = logging.getLogger("pipeline")

_BATCH, _BATCH_EMBEDDED = 8192, 64
MAX_FILES = 1_000_000


def parquet_files(path: Path | str) -> list[str]:
    """The Parquet files of ``path``: itself, or every ``*.parquet`` below it, sorted."""
    text = str(path)
    if location.is_remote(text):
        fs, inner = location.url_fs(text)
        try:
            if not fs.isdir(inner):
                return [text]
            found = sorted(p for p in fs.find(inner) if p.endswith(".parquet"))
        except Exception as e:
            raise fatal(path, f"cannot be listed ({type(e).__name__}: {e})") from None
        proto = location.scheme(text)
        return [f"{proto}://{p}" for p in found[:MAX_FILES]]
    p = Path(text).absolute()  # OUT records where a row came from, wherever it is read
    if not p.exists():
        raise fatal(path, "not found")
    if p.is_dir():
        return [str(f) for f in sorted(p.rglob("*.parquet"))
                if not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)]
    return [str(p)]


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "ref"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} & {"bytes",
                                                                                  "path"}:
        return "struct"
    return "other"


def _holds_binary(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or \
            pa.types.is_fixed_size_binary(t):
        return True
    if pa.types.is_struct(t):
        return any(_holds_binary(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _holds_binary(t.value_type)
    if pa.types.is_map(t):
        return _holds_binary(t.key_type) or _holds_binary(t.item_type)
    return False


class ParquetSource(Reopenable):
    kind = "parquet"

    def __init__(self, path: Path | str, fmt: ManifestFormat | None = None) -> None:
        self.path = path
        self.fmt = fmt or ManifestFormat()
        self.files = parquet_files(path)
        if not self.files:
            raise fatal(path, "holds no .parquet files")
        schema = self._schema(self.files[0])
        names = schema.names
        if self.fmt.image_column not in names:
            raise fatal(self.files[0], f"no column {self.fmt.image_column!r} (found "
                                       f"{', '.join(map(repr, names[:8]))}); name the image "
                                       "column with --image-column")
        if self.fmt.id_column != "id" and self.fmt.id_column not in names:
            raise fatal(self.files[0], f"no column {self.fmt.id_column!r} (--id-column)")
        self.image_kind = _kind(schema.field(self.fmt.image_column).type)
        if self.image_kind == "other":
            raise fatal(self.files[0], f"column {self.fmt.image_column!r} is "
                                       f"{schema.field(self.fmt.image_column).type}, not a "
                                       "path, binary or an image struct {bytes, path}")
        core = {self.fmt.image_column, self.fmt.id_column, "prompt"}
        skipped = [f.name for f in schema if f.name not in core and _holds_binary(f.type)]
        if skipped:
            log.warning("manifest %s: binary columns %s are not carried into OUT",
                        location.display(path), skipped)
        self.columns = names
        self._extras = carried(path, [n for n in names if n not in skipped], core,
                               reserved=[SOURCE_FILE])
        self.extra_columns = [name for _, name in self._extras] + [SOURCE_FILE]
        self.block_rows = 64 if self.image_kind != "ref" else 4096

    def estimate(self) -> int | None:
        total = 0
        for f in self.files:
            try:
                with _open(f) as pf:
                    total += pf.metadata.num_rows
            except (OSError, pa.ArrowException):
                return None
        return total

    def _schema(self, file: str) -> pa.Schema:
        try:
            with _open(file) as pf:
                return pf.schema_arrow
        except FileNotFoundError:
            raise fatal(file, "file not found") from None
        except (OSError, pa.ArrowException) as e:
            raise fatal(file, f"not a readable Parquet file ({_short(e)})") from None

    def __iter__(self) -> Iterator[ManifestRow]:
        return self.rows()

    def rows(self, wanted: Wanted | None = None) -> Iterator[ManifestRow]:
        for file in self.files:
            yield from _FileRows(self, file, wanted)


class _FileRows:
    """The rows of one Parquet file, row group by row group."""

    def __init__(self, src: ParquetSource, file: str, wanted: Wanted | None) -> None:
        self.src, self.file, self.wanted = src, file, wanted
        self.name = location.display(file)
        self.short = posixpath.basename(file.rstrip("/"))

    def __iter__(self) -> Iterator[ManifestRow]:
        src = self.src
        try:
            pf = _open(self.file)
        except (OSError, pa.ArrowException) as e:
            yield self._bad(0, f"not a readable Parquet file ({_short(e)})")
            return
        with pf:
            names = set(pf.schema_arrow.names)
            if src.fmt.image_column not in names:
                yield self._bad(0, f"no column {src.fmt.image_column!r}")
                return
            kind = _kind(pf.schema_arrow.field(src.fmt.image_column).type)
            start = 0
            for group in range(pf.num_row_groups):
                try:
                    yield from self._group(pf, group, kind, names, start)
                except (OSError, pa.ArrowException) as e:
                    yield self._bad(start + 1, f"row group {group} unreadable ({_short(e)})")
                start += pf.metadata.row_group(group).num_rows

    def _group(self, pf: pq.ParquetFile, group: int, kind: str, names: set[str],
               start: int) -> Iterator[ManifestRow]:
        src, fmt = self.src, self.src.fmt
        light = [c for c in (fmt.id_column,) if c in names]
        light.append(f"{fmt.image_column}.path" if kind == "struct" else fmt.image_column)
        columns = [c for c in (fmt.id_column, fmt.image_column, "prompt") if c in names]
        columns += [col for col, _ in src._extras if col in names]
        if kind in ("struct", "bytes") and self.wanted is not None:
            # The ids (and image names) first: a group with nothing pending is not read whole.
            head = pf.read_row_group(group, columns=light if kind == "struct"
                                     else [c for c in light if c != fmt.image_column])
            if not any(self.wanted(rid) for rid in self._ids(head, kind, start)):
                yield from self._rows(head, kind, start, embedded=False)
                return
        batch_rows = _BATCH_EMBEDDED if kind != "ref" else _BATCH
        n = start
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group],
                                     columns=columns, use_threads=False):
            table = pa.Table.from_batches([batch])
            yield from self._rows(table, kind, n, embedded=True)
            n += table.num_rows

    def _ids(self, table: pa.Table, kind: str, start: int) -> Iterator[str]:
        for row in self._rows(table, kind, start, embedded=False):
            yield row.id

    def _rows(self, table: pa.Table, kind: str, start: int, embedded: bool
              ) -> Iterator[ManifestRow]:
        fmt = self.src.fmt
        cols = set(table.column_names)
        n = table.num_rows
        ids = table.column(fmt.id_column).to_pylist() if fmt.id_column in cols else [None] * n
        images = table.column(fmt.image_column).to_pylist() if fmt.image_column in cols \
            else [None] * n
        prompts = table.column("prompt").to_pylist() if "prompt" in cols else [None] * n
        extras = [(name, table.column(col).to_pylist() if col in cols else [None] * n)
                  for col, name in self.src._extras]
        for i in range(n):
            line = start + i + 1
            extra = {name: text_value(values[i]) for name, values in extras}
            extra[SOURCE_FILE] = self.name
            yield self._row(line, ids[i], images[i], prompts[i], extra, kind, embedded)

    def _row(self, line: int, rid: Any, value: Any, prompt: Any, extra: dict[str, str | None],
             kind: str, embedded: bool) -> ManifestRow:
        rid = str(rid).strip() if rid is not None and not isinstance(rid, bytes) else ""
        prompt = prompt.strip() or None if isinstance(prompt, str) else None
        data: bytes | None = None
        if kind == "ref":
            image = (value or "").strip() if isinstance(value, str) else ""
            error = image_ref_problem(image)
        else:
            path = value.get("path") if isinstance(value, dict) else None
            raw = value.get("bytes") if isinstance(value, dict) else value
            image = path.strip() if isinstance(path, str) and path.strip() else \
                f"{self.short}#{line}"
            error = None
            if value is None or (kind == "struct" and raw is None and not path):
                error = f"{self.name} row {line}: the image is null"
            elif raw is None and kind == "struct" and embedded:
                error = image_ref_problem(image)  # a struct with a path only: a reference
            elif embedded and isinstance(raw, bytes | bytearray | memoryview):
                data = bytes(raw)
            elif embedded:
                error = f"{self.name} row {line}: the image is a {type(raw).__name__}, " \
                        "not bytes"
        if error and error.startswith("empty image cell"):
            error = f"{self.name} row {line}: empty image cell"
        rid = rid or (derive_id(image) if image else f"row-{line}")
        return ManifestRow(rid, image, prompt, line, extra, error=error, data=data)

    def _bad(self, line: int, problem: str) -> ManifestRow:
        extra: dict[str, str | None] = {c: None for c in self.src.extra_columns}
        extra[SOURCE_FILE] = self.name
        return ManifestRow(f"{self.short}#unreadable-{line}", "", None, line, extra,
                           error=f"{self.name}: {problem}")


def _open(file: str) -> pq.ParquetFile:
    # buffer_size: column chunks are read as streams of 1 MiB, not whole into memory
    # (a Hugging Face row group of images is ~100 MiB); no pre-buffering for the same reason.
    source: Any = location.open_binary(file, block_size=8 << 20) \
        if location.is_remote(file) else file
    return pq.ParquetFile(source, buffer_size=1 << 20, pre_buffer=False)


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
