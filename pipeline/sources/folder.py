"""A folder of images, walked recursively: LoRA / fine-tuning sets, photo dumps.

* Images are found by content, not extension: the first bytes of each file are sniffed
  (JPEG, PNG, GIF, WebP, TIFF, BMP, HEIC/HEIF, AVIF); anything else is not a row.
  Hidden files and folders (``.name``) and caption sidecars are skipped.
* The id is the path relative to the folder (``cats/tabby.jpg``), and ``image`` is the
  same relative path, resolved against the folder (local or remote).
* An existing caption beside an image (``tabby.txt``, else ``tabby.caption``) is the
  column ``existing_caption`` (UTF-8, at most ``MAX_SIDECAR`` bytes), which prompt
  templates may use: ``--prompt "Improve this caption: {existing_caption}"``.
* A file that cannot be read (permissions, a vanished file) is an error row naming it;
  ``line`` is the image's position in the walk (folders and files in name order, so
  the same tree gives the same positions).

Memory: the walk holds one folder's listing at a time (names are sorted per folder).
A finished id is not sniffed again (``wanted``): its file is not opened on resume.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections.abc import Iterator
from pathlib import Path

from ..images.prepare import sniff_mime
from ..records import ManifestRow
from . import location
from .base import Reopenable, Wanted, fatal

__all__ = ["EXISTING_CAPTION", "FolderSource"]

log = logging.getLogger("pipeline")

EXISTING_CAPTION = "existing_caption"
SIDECARS = (".txt", ".caption")
_NOT_IMAGES = frozenset({".txt", ".caption", ".json", ".jsonl", ".csv", ".tsv", ".md",
                         ".parquet", ".toml", ".yaml", ".yml", ".npz", ".tags"})
MAX_SIDECAR = 64 * 1024
_SNIFF = 32


class FolderSource(Reopenable):
    kind = "folder"
    block_rows = 256  # each row may cost a file open: show progress early

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self.remote = location.is_remote(path)
        if self.remote:
            self.fs, self.root = location.url_fs(str(path))
            try:
                ok = self.fs.isdir(self.root)
            except Exception as e:
                raise fatal(path, f"cannot be listed ({type(e).__name__}: {e})") from None
            if not ok:
                raise fatal(path, "is not a folder")
        else:
            if not Path(path).is_dir():
                raise fatal(path, "is not a folder")
            self.root = str(path)
        self.columns = ["id", "image", EXISTING_CAPTION]
        self.extra_columns = [EXISTING_CAPTION]

    def estimate(self) -> int | None:
        return None  # counting would mean a second walk of the tree

    def __iter__(self) -> Iterator[ManifestRow]:
        return self.rows()

    def rows(self, wanted: Wanted | None = None) -> Iterator[ManifestRow]:
        line = 0
        for rel, names in self._walk():
            for name in names:
                stem, ext = posixpath.splitext(name)
                if ext.lower() in _NOT_IMAGES:
                    continue
                rid = posixpath.join(rel, name) if rel else name
                done = wanted is not None and not wanted(rid)
                problem = None if done else self._sniff(rid)
                if problem == "":
                    continue  # not an image: a file of another kind
                line += 1
                caption = None if done or problem else self._sidecar(rel, stem, names)
                yield ManifestRow(rid, rid, None, line, {EXISTING_CAPTION: caption},
                                  error=problem)

    def _walk(self) -> Iterator[tuple[str, list[str]]]:
        """(folder relative to the root, its file names sorted), folders in name order."""
        if self.remote:
            yield from self._walk_remote()
            return
        stack = [""]
        while stack:
            rel = stack.pop()
            here = os.path.join(self.root, rel) if rel else self.root
            try:
                with os.scandir(here) as it:
                    entries = sorted((e for e in it if not e.name.startswith(".")),
                                     key=lambda e: e.name)
            except OSError as e:
                log.warning("folder %s: cannot be listed (%s); skipped", here, e.strerror)
                continue
            files = [e.name for e in entries if not _is_dir(e)]
            dirs = [e.name for e in entries if _is_dir(e)]
            yield rel, files
            stack.extend(posixpath.join(rel, d) if rel else d for d in reversed(dirs))

    def _walk_remote(self) -> Iterator[tuple[str, list[str]]]:
        root = self.root.rstrip("/")
        try:
            walk = self.fs.walk(root)
            for here, dirs, files in walk:
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = here[len(root):].strip("/")
                yield rel, sorted(f for f in files if not f.startswith("."))
        except Exception as e:
            raise fatal(self.path, f"cannot be listed ({type(e).__name__}: {e})") from None

    def _full(self, rid: str) -> str:
        if self.remote:
            return location.join(str(self.path), rid)
        return os.path.join(self.root, rid)

    def _sniff(self, rid: str) -> str | None:
        """None: an image; "": no image (or no regular file); else why it cannot be read."""
        full = self._full(rid)
        try:
            head = self._head_remote(full) if self.remote else _head_local(full)
        except IsADirectoryError:
            return ""
        except OSError as e:
            return f"{location.display(full)}: cannot be read ({e.strerror or e})"
        return None if head is not None and sniff_mime(head) else ""

    @staticmethod
    def _head_remote(full: str) -> bytes:
        with location.open_binary(full, block_size=4096) as f:
            return f.read(_SNIFF)

    def _sidecar(self, rel: str, stem: str, names: list[str]) -> str | None:
        present = set(names)
        for ext in SIDECARS:
            if stem + ext in present:
                path = self._full(posixpath.join(rel, stem + ext) if rel else stem + ext)
                try:
                    with location.open_binary(path, block_size=MAX_SIDECAR) as f:
                        raw = f.read(MAX_SIDECAR + 1)
                except OSError:
                    return None
                if len(raw) > MAX_SIDECAR:
                    return None  # not a caption: too long to be one
                try:
                    return raw.decode("utf-8-sig").strip() or None
                except UnicodeDecodeError:
                    return None
        return None


def _head_local(path: str) -> bytes | None:
    """The first bytes of a regular file; None for a FIFO, device or socket (opened
    without blocking, so a FIFO with no writer cannot hang the walk)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, _SNIFF)
    finally:
        os.close(fd)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False
