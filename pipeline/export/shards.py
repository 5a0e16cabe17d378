"""``--format webdataset``: the source's shards written back with their captions.

For an OUT captioned from WebDataset shards (its rows carry ``source_file`` and
``source_member``, see sources/webdataset.py), ``--to DEST`` gets one shard per source
shard (same name, ``.tar``), each sample in its source order under the same
``__key__``:

* every member of the source sample is copied byte for byte (the image included),
  except its ``.txt`` and ``.json``;
* ``<key>.txt``: the caption of the first exported prompt name (``--prompt-name``
  order, else ``_dataset.json``'s), with ``--trigger``; other prompt names get
  ``<key>.<name>.txt``;
* ``<key>.json``: the source sample's JSON fields, plus ``captioning``: every prompt
  name's caption, the model, the token usage, ``finished_at`` (and ``status``/``error``
  with ``--include-errors``).

A sample whose key has no exported row is left out (counted). Rows arrive in OUT's
order, so they are staged in a temporary SQLite table (16 MiB of cache, then the disk)
and each source shard is then streamed once, one sample in memory at a time; a new
shard is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..sources import location
from ..sources.webdataset import sample_key
from .base import ExportError, Job, Writer, caption_text, jsonable, tmp_path

__all__ = ["WebDatasetWriter"]

_STAGE_ROWS = 5000
_MAX_META = 1 << 20  # a source .json larger than this is copied as it is, not merged
_COLUMNS = ("id", "prompt_name", "caption", "captions", "model", "prompt_tokens",
            "completion_tokens", "total_tokens", "finished_at", "source_file",
            "source_member", "status", "error", "error_class")


class WebDatasetWriter(Writer):
    name = "webdataset"

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        missing = [c for c in ("source_file", "source_member") if c not in
                   job.committed.schema.names]
        if missing:
            raise ExportError("--format webdataset writes back WebDataset shards: OUT was "
                              "not captioned from shards (it has no source_file / "
                              "source_member columns)")
        assert self.spec.dest is not None
        self.dest = self.spec.dest
        self.stage: _Stage | None = None
        self.tmp: Path | None = None

    def read_columns(self) -> list[str]:
        have = set(self.job.committed.schema.names)
        return [c for c in _COLUMNS if c in have]

    def prepare(self) -> None:
        self.dest.mkdir(parents=True, exist_ok=True)
        self.stage = _Stage()

    def write(self, rows: list[dict[str, Any]]) -> None:
        assert self.stage is not None
        rank = {name: i for i, name in enumerate(self.job.prompt_order)}
        for r in rows:
            shard = r.get("source_file")
            if not shard or not r.get("source_member"):
                self.job.summary.skip("rows without a source shard member", str(r["id"]))
                continue
            info = {k: jsonable(r.get(k)) for k in ("model", "prompt_tokens",
                                                    "completion_tokens", "total_tokens",
                                                    "finished_at", "status", "error",
                                                    "error_class")}
            self.stage.add(shard, r["id"], rank.get(r["prompt_name"], len(rank)),
                           r["prompt_name"],
                           caption_text(r.get("caption"), self.spec.trigger), info)

    def finish(self) -> None:
        assert self.stage is not None
        used: set[str] = set()
        for shard in self.stage.shards():
            self.job.check_stop()
            final = self.dest / _unique(shard, used)
            self.tmp = tmp_path(final)
            try:
                self._rewrite(shard, self.tmp)
            except FileNotFoundError:
                self.job.summary.skip("source shards not found", shard)
                self.tmp.unlink(missing_ok=True)
                continue
            os.replace(self.tmp, final)
            self.tmp = None
        self.stage.close()

    def abort(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
        if self.stage is not None:
            self.stage.close()

    def _rewrite(self, shard: str, target: Path) -> None:
        assert self.stage is not None
        with location.open_binary(shard) as f, open(target, "wb") as raw:
            src = tarfile.open(fileobj=f, mode="r|gz" if shard.endswith(("gz", "tgz"))
                               else "r|")
            with src, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as out:
                for key, members in _samples(src):
                    captions = self.stage.captions(shard, key)
                    if not captions:
                        self.job.summary.skip("samples without an exported caption")
                        continue
                    self._sample(out, key, members, captions)
            raw.flush()
            os.fsync(raw.fileno())

    def _sample(self, out: tarfile.TarFile, key: str, members: list[tuple[tarfile.TarInfo,
                bytes]], captions: list[tuple[str, str | None, dict[str, Any]]]) -> None:
        meta: dict[str, Any] = {}
        for info, data in members:
            ext = sample_key(info.name)[1]
            if ext == "json":
                found = _meta(data)
                if found is None:  # not a JSON object: kept as it is, under another name
                    _add(out, f"{key}.source.json", data, info)
                meta = found or {}
            elif ext != "txt":
                _add(out, info.name, data, info)  # the image and the rest, byte for byte
        first = True
        for name, caption, _ in captions:
            if caption is not None:
                suffix = "txt" if first else f"{name}.txt"
                _add(out, f"{key}.{suffix}", caption.encode("utf-8"))
                first = False
        meta["captioning"] = _captioning(captions)
        _add(out, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        self.job.summary.written += 1


def _captioning(captions: list[tuple[str, str | None, dict[str, Any]]]) -> dict[str, Any]:
    """What the ``.json`` member says of the captions: the first prompt's caption, model
    and usage at the top, and every prompt name's under ``prompts``."""
    def one(caption: str | None, info: dict[str, Any]) -> dict[str, Any]:
        usage = {k: info.get(k) for k in ("prompt_tokens", "completion_tokens",
                                          "total_tokens")}
        extra = {k: info[k] for k in ("status", "error", "error_class")
                 if info.get(k) is not None and info.get("status") != "ok"}
        return {"caption": caption, "model": info.get("model"), "usage": usage,
                "finished_at": info.get("finished_at"), **extra}

    first_name, first_caption, first_info = captions[0]
    return {"prompt_name": first_name, **one(first_caption, first_info),
            "prompts": {name: one(caption, info) for name, caption, info in captions}}


def _meta(data: bytes) -> dict[str, Any] | None:
    if len(data) > _MAX_META:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _samples(src: tarfile.TarFile) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo,
                                                                      bytes]]]]:
    """(key, [(member, bytes)]) of a streamed shard: one sample's members at a time."""
    key: str | None = None
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    for m in src:
        if not m.isfile():
            continue
        k = sample_key(m.name)[0]
        if k != key and members:
            yield key or "", members
            members = []
        key = k
        handle = src.extractfile(m)
        members.append((m, handle.read() if handle is not None else b""))
    if members:
        yield key or "", members


def _add(out: tarfile.TarFile, name: str, data: bytes,
         like: tarfile.TarInfo | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = like.mode if like is not None else 0o644
    info.mtime = like.mtime if like is not None else 0
    out.addfile(info, io.BytesIO(data))


def _unique(shard: str, used: set[str]) -> str:
    base = posixpath.basename(shard.rstrip("/"))
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    name, n = f"{base}.tar", 1
    while name in used:
        n += 1
        name = f"{base}-{n}.tar"
    used.add(name)
    return name


class _Stage:
    """Captions per (shard, key), on disk until the shards are rewritten."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="caption-export-wds-")
        self.db = sqlite3.connect(os.path.join(self.dir, "stage.db"))
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE",
                       "cache_size=-16384"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE s (shard TEXT, key TEXT, rank INT, name TEXT, "
                        "caption TEXT, info TEXT)")
        self.pending: list[tuple[str, str, int, str, str | None, str]] = []
        self.indexed = False

    def add(self, shard: str, key: str, rank: int, name: str, caption: str | None,
            info: dict[str, Any]) -> None:
        self.pending.append((shard, key, rank, name, caption, json.dumps(info)))
        if len(self.pending) >= _STAGE_ROWS:
            self._flush()

    def _flush(self) -> None:
        self.db.executemany("INSERT INTO s VALUES (?, ?, ?, ?, ?, ?)", self.pending)
        self.pending.clear()

    def shards(self) -> list[str]:
        self._flush()
        self.db.execute("CREATE INDEX k ON s (shard, key, rank)")
        self.db.commit()
        return [r[0] for r in self.db.execute("SELECT DISTINCT shard FROM s ORDER BY shard")]

    def captions(self, shard: str, key: str) -> list[tuple[str, str | None, dict[str, Any]]]:
        rows = self.db.execute("SELECT name, caption, info FROM s WHERE shard = ? AND key = ? "
                               "ORDER BY rank, name", (shard, key))
        return [(n, c, json.loads(i)) for n, c, i in rows]

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)


