"""``--format hf-parquet``: Parquet shards with the image inside, Hugging Face style.

``DEST/data/train-00000-of-0000N.parquet``: an ``image`` column of ``{bytes, path}``
structs (the ``datasets.Image`` storage) and the exported columns, with the
``datasets`` feature description in the schema's ``huggingface`` metadata, so
``datasets.load_dataset("parquet", data_dir=DEST)`` (or the Hub, after a push) yields
an ``Image`` feature and the caption columns as they are typed in OUT.

A local image is embedded byte for byte (``path`` is its path relative to the
manifest's folder); an http(s) image is kept as ``{bytes: null, path: URL}``, which
``datasets`` downloads when the example is decoded. Missing files and images over
``MAX_IMAGE_BYTES`` are skipped and counted.

Rows are buffered up to a row group of 64 MiB of images or 1000 rows, whichever comes
first, so memory stays flat; a new shard starts after ``--shard-size`` MiB. Shards are
written under temporary names and renamed once their count is known.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .base import Job, Writer, with_trigger
from .embedded import Embedded, Found
from .images import ImageRef

__all__ = ["HfParquetWriter", "IMAGE_TYPE", "features"]

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MAX_IMAGE_BYTES = 256 * 1024 * 1024
ROW_GROUP_BYTES = 64 * 1024 * 1024
ROW_GROUP_ROWS = 1000
_VALUE = {pa.string(): "string", pa.large_string(): "large_string", pa.bool_(): "bool",
          pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
          pa.float32(): "float32", pa.float64(): "float64", pa.binary(): "binary"}


def _feature(t: pa.DataType) -> Any:
    """The ``datasets`` feature of an Arrow type as JSON, or None (left to inference)."""
    if t.equals(IMAGE_TYPE):
        return {"_type": "Image"}
    if pa.types.is_list(t):
        inner = _feature(t.value_type)
        return [inner] if inner is not None else None  # a list literal: every version
    if pa.types.is_timestamp(t):
        tz = f", tz={t.tz}" if t.tz else ""
        return {"dtype": f"timestamp[{t.unit}{tz}]", "_type": "Value"}
    for arrow, dtype in _VALUE.items():
        if t.equals(arrow):
            return {"dtype": dtype, "_type": "Value"}
    return None


def features(schema: pa.Schema) -> dict[str, Any]:
    return {f.name: feat for f in schema if (feat := _feature(f.type)) is not None}


class HfParquetWriter(Writer):
    name = "hf-parquet"
    reserved = frozenset({"image"})  # the column is the embedded image

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.embedded = Embedded(MAX_IMAGE_BYTES)
        assert self.spec.dest is not None
        self.data = self.spec.dest / "data"
        self.cols = [c for c in job.columns if c not in self.reserved]
        fields = [pa.field("image", IMAGE_TYPE),
                  *(job.committed.schema.field(c) for c in self.cols)]
        plain = pa.schema(fields)
        meta = {"info": {"features": features(plain)}}
        self.schema = plain.with_metadata({"huggingface": json.dumps(meta)})
        self.buf: list[dict[str, Any]] = []
        self.buf_bytes = 0
        self.shards: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.shard_written = 0
        self.group_bytes = min(ROW_GROUP_BYTES, self.spec.shard_bytes)  # shards cut here

    def prepare(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)

    def write(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            found = self.embedded.find(r)
            image = self._embedded(found) if found is not None else \
                self._image(self.job.resolver.resolve(r.get("image")))
            if image is None:
                continue
            rec = with_trigger({c: r.get(c) for c in self.cols}, self.spec.trigger)
            rec["image"] = image
            self.buf.append(rec)
            self.buf_bytes += len(image["bytes"] or b"")
            self.job.summary.written += 1
            if self.buf_bytes >= self.group_bytes or len(self.buf) >= ROW_GROUP_ROWS:
                self._flush()

    def _embedded(self, found: Found) -> dict[str, Any] | None:
        """An image that lives inside the source (a Parquet struct, a shard member)."""
        if found.data is None:
            self.job.summary.skip(found.why, found.rel)
            return None
        return {"bytes": found.data, "path": found.rel}

    def _image(self, ref: ImageRef) -> dict[str, Any] | None:
        s = self.job.summary
        if ref.url is not None:
            return {"bytes": None, "path": ref.url}
        if ref.path is None or ref.rel is None:
            s.skip("rows without an image")
            return None
        try:
            with open(ref.path, "rb") as f:
                data = f.read(MAX_IMAGE_BYTES + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            s.skip("missing or unreadable image files", ref.path)
            return None
        if len(data) > MAX_IMAGE_BYTES:
            s.skip(f"images over {MAX_IMAGE_BYTES >> 20} MiB", ref.path)
            return None
        return {"bytes": data, "path": ref.rel}

    def _flush(self) -> None:
        if not self.buf:
            return
        if self.writer is None or self.shard_written >= self.spec.shard_bytes:
            self._next_shard()
        assert self.writer is not None
        self.writer.write_table(pa.Table.from_pylist(self.buf, schema=self.schema),
                                row_group_size=len(self.buf))
        self.shard_written += self.buf_bytes
        self.buf.clear()
        self.buf_bytes = 0

    def _next_shard(self) -> None:
        self._close_shard()
        tmp = self.data / f".train-{len(self.shards):05d}.parquet.tmp"
        self.shards.append(tmp)
        self.writer = pq.ParquetWriter(tmp, self.schema, compression="zstd")
        self.shard_written = 0

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with open(self.shards[-1], "rb") as f:
                os.fsync(f.fileno())
            self.writer = None

    def finish(self) -> None:
        self.embedded.close()
        self._flush()
        if not self.shards:  # no rows: one empty shard, so the dataset still loads
            self._next_shard()
        self._close_shard()
        for old in self.data.glob("train-*.parquet"):  # an earlier export's (--force)
            old.unlink()
        n = len(self.shards)
        for i, tmp in enumerate(self.shards):
            os.replace(tmp, self.data / f"train-{i:05d}-of-{n:05d}.parquet")
        self.shards = []

    def abort(self) -> None:
        self.embedded.close()
        if self.writer is not None:
            try:
                self.writer.close()
            except (OSError, pa.ArrowException):
                pass
            self.writer = None
        for tmp in self.shards:
            tmp.unlink(missing_ok=True)
