"""Which source reads an input: by ``--format``, else by the input's form.

| form | source |
|---|---|
| a brace pattern (``{00000..00099}``), ``*.tar``, ``*.tar.gz``, ``*.tgz`` | webdataset |
| ``*.jsonl``, ``*.ndjson`` | jsonl |
| ``*.parquet``, ``*.pq`` | parquet |
| a folder (local or remote) | folder (``--format parquet`` / ``webdataset``: a folder of those) |
| ``*.tsv`` | csv, tab-separated |
| anything else, standard input | csv |
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from . import location
from .base import Source, fatal
from .braces import has_braces
from .manifest_format import SOURCE_KINDS, ManifestFormat, base_dir, is_stdin

__all__ = ["KINDS", "detect_kind", "open_source", "source_base"]

KINDS = SOURCE_KINDS


def _is_dir(path: Path | str) -> bool:
    if location.is_remote(path):
        fs, inner = location.url_fs(str(path))
        try:
            return bool(fs.isdir(inner))
        except Exception as e:
            raise fatal(path, f"cannot be reached ({type(e).__name__}: {e})") from None
    return Path(path).is_dir()


def detect_kind(path: Path | str, fmt: ManifestFormat) -> str:
    if fmt.kind:
        return "csv" if fmt.kind == "tsv" else fmt.kind
    text = str(path)
    if is_stdin(text):
        return "csv"
    lower = text.lower().rstrip("/")
    if has_braces(text) or lower.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if _is_dir(path):
        return "folder"
    return "csv"


def open_source(path: Path | str, fmt: ManifestFormat | None = None,
                max_member: int | None = None) -> Source:
    """The source for ``path`` (exit 2 with one line when it cannot be read at all)."""
    fmt = fmt or ManifestFormat()
    kind = detect_kind(path, fmt)
    if fmt.kind == "tsv" or (kind == "csv" and fmt.delimiter is None
                             and str(path).lower().endswith(".tsv")):
        fmt = ManifestFormat("\t", fmt.image_column, fmt.id_column, fmt.kind)
    if kind == "jsonl":
        from .jsonl import JsonLines

        return cast(Source, JsonLines(path, fmt))
    if kind == "parquet":
        from .parquet import ParquetSource

        return cast(Source, ParquetSource(path, fmt))
    if kind == "folder":
        from .folder import FolderSource

        return cast(Source, FolderSource(path))
    if kind == "webdataset":
        from .webdataset import MAX_MEMBER, WebDatasetSource

        return cast(Source, WebDatasetSource(path, fmt, max_member or MAX_MEMBER))
    from .manifest import Manifest

    return cast(Source, Manifest(path, fmt))


def source_base(path: Path | str, fmt: ManifestFormat | None = None) -> Path | str:
    """Where a source's relative image references resolve: the folder itself for a
    folder source (or a folder of Parquet files), else the manifest's folder; a URL
    (str) when the input is remote."""
    fmt = fmt or ManifestFormat()
    text = str(path)
    remote = location.is_remote(text)
    kind = detect_kind(path, fmt)
    folder = kind == "folder" or (kind == "parquet" and _is_dir(path))
    if remote:
        return text.rstrip("/") if folder else location.parent(text)
    if folder:
        return Path(text)
    return base_dir(Path(text))
