"""WebDataset shards (img2dataset's output): ``.tar`` files of samples grouped by key.

* Shards: one ``.tar``, a brace pattern (``shards/{00000..00099}.tar``, ``{a,b}.tar``),
  or a folder of ``*.tar`` (name order); local or remote.
* One row per ``__key__`` (the member name up to the first dot of its base name, as the
  webdataset library splits it); members of one key are consecutive. The image is the
  member with the first image extension of ``IMAGE_EXTENSIONS``; its bytes are embedded
  in the row (never written to OUT). The ``.json`` member's top-level fields become
  columns (the fields of the first samples of the first shard, as for JSON lines) and
  ``.txt`` becomes ``existing_caption``.
* ``id`` = the key, ``image`` = ``<shard file name>/<member>``, ``line`` = the sample's 1-based
  position in its shard, ``source_file`` = the shard, ``source_member`` = the member.
* Broken records are error rows naming the shard and position: a key without an image,
  a member over ``--max-file-bytes``, a truncated member or archive (the rest of that
  shard cannot be read: one error row says so), a shard that cannot be opened.
* Resume: a finished key's members are not read (``wanted``); an uncompressed shard is
  then walked header by header (``tarstream`` seeks past the data), so a finished shard
  costs its headers, not its images. Memory: one sample's members at a time.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from ..records import ManifestRow
from . import location, tarstream
from .base import SOURCE_FILE, SOURCE_MEMBER, Reopenable, Wanted, carried, fatal, text_value
from .braces import BraceError, expand, has_braces
from .folder import EXISTING_CAPTION
from .manifest_format import ManifestFormat

__all__ = ["IMAGE_EXTENSIONS", "WebDatasetSource", "sample_key", "shard_list"]

log = logging.getLogger("pipeline")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp", "heic",
                    "heif", "avif", "img", "image")
_RANK = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
SCAN_SAMPLES = 100
MAX_JSON, MAX_TEXT = 1 << 20, 64 * 1024
MAX_MEMBER = 256 << 20  # --max-file-bytes's default; the run passes its own


def sample_key(name: str) -> tuple[str, str]:
    """(``__key__``, extension) of a member: ``a/b/000.seg.png`` -> (``a/b/000``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower() if dot else ""


def shard_list(path: Path | str) -> list[str]:
    text = str(path)
    if has_braces(text):
        try:
            names = expand(text)
        except BraceError as e:
            raise fatal(path, str(e)) from None
        return names if location.is_url(text) else [os.path.abspath(n) for n in names]
    if location.is_remote(text):
        fs, inner = location.url_fs(text)
        try:
            if fs.isdir(inner):
                proto = location.scheme(text)
                return [f"{proto}://{p}" for p in sorted(fs.find(inner))
                        if p.endswith((".tar", ".tar.gz", ".tgz"))]
        except Exception as e:
            raise fatal(path, f"cannot be listed ({type(e).__name__}: {e})") from None
        return [text]
    p = Path(text).absolute()  # OUT records where a row came from, wherever it is read
    if p.is_dir():
        return [str(f) for f in sorted(p.iterdir())
                if f.name.endswith((".tar", ".tar.gz", ".tgz")) and not f.name.startswith(".")]
    return [str(p)]


@dataclass
class _Sample:
    key: str
    index: int
    wanted: bool
    image: tuple[str, bytes | None] | None = None  # (member name, bytes if read)
    rank: int = len(IMAGE_EXTENSIONS)
    meta: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    members: list[str] = field(default_factory=list)
    problem: str | None = None


class WebDatasetSource(Reopenable):
    kind = "webdataset"
    block_rows = 64

    def __init__(self, path: Path | str, fmt: ManifestFormat | None = None,
                 max_member: int = MAX_MEMBER) -> None:
        self.path = path
        self.fmt = fmt or ManifestFormat()
        self.max_member = max_member
        self.shards = shard_list(path)
        if not self.shards:
            raise fatal(path, "names no .tar shards")
        fields = self._scan_fields(self.shards[0])
        reserved = [SOURCE_FILE, SOURCE_MEMBER, EXISTING_CAPTION]
        self._extras = carried(path, fields, {"id", "image", "prompt"}, reserved=reserved)
        self.columns = ["id", "image", EXISTING_CAPTION, *fields]
        self.extra_columns = [name for _, name in self._extras] + reserved

    def estimate(self) -> int | None:
        return None  # counting keys would mean reading every shard's headers twice

    def _scan_fields(self, shard: str) -> list[str]:
        names: dict[str, None] = {}
        try:
            for sample in _Shard(shard, lambda key: True, self.max_member, only_json=True):
                if isinstance(sample.meta, dict):
                    names.update(dict.fromkeys(str(k) for k in sample.meta))
                if sample.index >= SCAN_SAMPLES:
                    break
        except FileNotFoundError:
            raise fatal(shard, "shard not found") from None
        except (OSError, tarstream.TarError) as e:
            log.warning("shard %s: cannot be read for its .json fields (%s)",
                        location.display(shard), e)
        return list(names)

    def __iter__(self) -> Iterator[ManifestRow]:
        return self.rows()

    def rows(self, wanted: Wanted | None = None) -> Iterator[ManifestRow]:
        want = wanted or (lambda key: True)
        for shard in self.shards:
            name = location.display(shard)
            try:
                for sample in _Shard(shard, want, self.max_member):
                    yield self._row(name, sample)
            except (OSError, tarstream.TarError) as e:  # could not be opened at all
                yield self._unreadable(name, e)

    def _row(self, shard: str, s: _Sample) -> ManifestRow:
        member = s.image[0] if s.image else (s.members[0] if s.members else "")
        extra: dict[str, str | None] = {n: text_value(s.meta.get(c)) for c, n in self._extras}
        extra.update({SOURCE_FILE: shard, SOURCE_MEMBER: member or None,
                      EXISTING_CAPTION: s.text})
        # The shard's file name, not its path: moving the shards must not make the ids
        # OUT holds look like ids of other images (source_file says where they are).
        image = f"{posixpath.basename(shard)}/{member}" if member else posixpath.basename(shard)
        error = s.problem
        if error is None and s.image is None:
            error = f"{shard} sample {s.index} ({s.key!r}): no image member (found " \
                    f"{', '.join(s.members) or 'nothing'})"
        data = s.image[1] if s.image and error is None and s.wanted else None
        return ManifestRow(s.key, image, None, s.index, extra, error=error, data=data)

    def _unreadable(self, shard: str, e: BaseException) -> ManifestRow:
        extra: dict[str, str | None] = {c: None for c in self.extra_columns}
        extra[SOURCE_FILE] = shard
        reason = "not found" if isinstance(e, FileNotFoundError) else f"{e}"
        return ManifestRow(f"{posixpath.basename(shard)}#unreadable", shard, None, 0, extra,
                           error=f"shard {shard}: cannot be read ({reason})")


class _Shard:
    """The samples of one shard, read member by member (``tarstream``)."""

    def __init__(self, shard: str, wanted: Wanted, max_member: int,
                 only_json: bool = False) -> None:
        self.shard, self.wanted, self.max_member = shard, wanted, max_member
        self.only_json = only_json
        self.name = location.display(shard)

    def __iter__(self) -> Iterator[_Sample]:
        with location.open_binary(self.shard) as raw:
            if self.shard.endswith((".gz", ".tgz")):
                with gzip.GzipFile(fileobj=raw) as f:
                    yield from self._samples(cast(IO[bytes], f))
            else:
                yield from self._samples(raw)

    def _samples(self, f: IO[bytes]) -> Iterator[_Sample]:
        current: _Sample | None = None
        index = 0
        found = tarstream.members(f)
        while True:
            try:
                m = next(found, None)
            except (tarstream.TarError, OSError, EOFError) as e:
                yield self._broken(current, index, f"archive truncated or corrupt ({e})")
                return
            if m is None:
                break
            key, ext = sample_key(m.name)
            if current is None or key != current.key:
                if current is not None:
                    yield current
                index += 1
                current = _Sample(key, index, self.wanted(key))
            current.members.append(posixpath.basename(m.name))
            try:
                self._member(f, m, ext, current)
            except (tarstream.TarError, OSError, EOFError) as e:
                yield self._broken(current, index, f"member {m.name!r} truncated or "
                                                   f"unreadable ({e})")
                return
        if current is not None:
            yield current

    def _broken(self, current: _Sample | None, index: int, why: str) -> _Sample:
        """The sample being read when the shard broke, as an error (the rest is lost)."""
        s = current or _Sample(f"{posixpath.basename(self.shard)}#broken-{index + 1}",
                               index + 1, True)
        s.problem = f"{self.name} sample {s.index} ({s.key!r}): {why}; the rest of the " \
                    "shard cannot be read"
        return s

    def _member(self, f: IO[bytes], m: tarstream.Member, ext: str, s: _Sample) -> None:
        if ext == "json":
            if m.size > MAX_JSON:
                s.problem = s.problem or f"{self.name} sample {s.index}: {m.name!r} is " \
                                         f"larger than {MAX_JSON} bytes"
                return
            try:
                meta = json.loads(_read(f, m))
            except ValueError as e:
                if s.wanted and not self.only_json:
                    s.problem = f"{self.name} sample {s.index} ({s.key!r}): {m.name!r} " \
                                f"is not JSON ({' '.join(str(e).split())[:100]})"
                return
            s.meta = meta if isinstance(meta, dict) else {}
            return
        if self.only_json:
            return
        if ext == "txt":
            if s.wanted and m.size <= MAX_TEXT:
                s.text = _read(f, m).decode("utf-8", "replace").strip() or None
            return
        rank = _RANK.get(ext)
        if rank is None or rank >= s.rank:
            return
        s.rank = rank
        name = posixpath.basename(m.name)
        if not s.wanted:  # finished: its name is enough, its bytes are not read
            s.image = (name, None)
        elif m.size > self.max_member:
            s.image = (name, None)
            s.problem = f"{self.name} sample {s.index} ({s.key!r}): {m.name!r} is " \
                        f"{m.size} bytes > {self.max_member} (--max-file-bytes)"
        else:
            s.image = (name, _read(f, m))


def _read(f: IO[bytes], m: tarstream.Member) -> bytes:
    return tarstream.read(f, m)
