"""Where a row's image is, where its copy goes under DEST, and placing that copy.

An ``image`` value is an http(s) URL, an absolute path, or a path relative to the
manifest's folder (``base_dir`` in ``OUT/_dataset.json``, or ``--base-dir``). Paths are
normalised as strings (``a/./b/../c.png`` is ``a/c.png``); the filesystem is asked
only when a format needs the file. Under DEST an image keeps its path relative to
``base_dir``; one outside it keeps its absolute path without the leading ``/``.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .base import ExportError, copy_atomic

__all__ = ["ImageRef", "Resolver", "place", "PLACE_MODES"]

PLACE_MODES = ("copy", "hardlink", "symlink")


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Paths as strings: a million rows of pathlib objects cost seconds, strings do not."""

    value: str | None          # as OUT holds it
    url: str | None = None     # an http(s) image
    path: str | None = None    # a local image, absolute and normalised
    rel: str | None = None     # where it goes under DEST (POSIX, relative)

    @property
    def skip_reason(self) -> str | None:
        """Why a format that needs the image file cannot use this one, or None."""
        if self.url is not None:
            return "http(s) images (no local file)"
        if self.path is None:
            return "rows without an image"
        return None


class Resolver:
    def __init__(self, base_dir: Path | None, where: str) -> None:
        self.base = os.path.normpath(os.path.abspath(base_dir)) if base_dir else None
        self.prefix = self.base.rstrip("/") + "/" if self.base else None
        self.where = where  # named in the error when base_dir is needed but unknown

    def resolve(self, value: str | None, strict: bool = True) -> ImageRef:
        """``strict``: a relative path without a known base_dir stops the export."""
        if not value:
            return ImageRef(value)
        if value[:8].lower().startswith(("http://", "https://")):
            return ImageRef(value, url=value)
        if value.startswith("/"):
            path = os.path.normpath(value)
        elif self.base is not None:
            path = os.path.normpath(os.path.join(self.base, value))
        elif strict:
            raise ExportError(f"{self.where} does not say where relative image paths such "
                              f"as {value!r} start (no readable _dataset.json): pass "
                              "--base-dir DIR, the folder of the manifest")
        else:
            return ImageRef(value)
        if self.prefix is not None and path.startswith(self.prefix):
            rel = path[len(self.prefix):]
        else:
            rel = path.lstrip("/")
        return ImageRef(value, path=path, rel=rel)


def place(src: str, dst: Path, how: str) -> bool:
    """Put ``src`` at ``dst`` (copy, hard link or symlink); False when already there.

    A copy is "already there" when size and modification time match (``copy2`` keeps
    the time), so a second export does not copy again. A hard link across filesystems
    falls back to a copy.
    """
    if _same(src, dst, how):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    if how == "copy":
        copy_atomic(src, dst)
        return True
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if how == "symlink":
            os.symlink(src, tmp)
        else:
            try:
                os.link(src, tmp)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP):
                    raise  # only "cannot link here" falls back to a copy
                shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _same(src: str, dst: Path, how: str) -> bool:
    try:
        if how == "symlink":
            return dst.is_symlink() and os.readlink(dst) == src
        if dst.is_symlink():
            return False
        a, b = os.stat(src), dst.stat()
    except OSError:
        return False
    if how == "hardlink" and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns
