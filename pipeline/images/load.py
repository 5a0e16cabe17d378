"""Image references → what is sent, prepared off the event loop.

Local files (and, with ``--fetch-urls``, downloaded URLs) are read and prepared by
``imageprep.prepare`` in a thread pool sized to the cores: Pillow releases the GIL
while it decodes, resizes and encodes, so streams keep flowing while images are
prepared. Without ``--fetch-urls`` a URL is passed through for the provider to fetch.
Every local problem is a ``RowFailed`` with class ``bad_image``.

Reads are bounded in kind, size and time. Only a regular file is read: a FIFO would
block the reading thread forever and ``/dev/zero`` never ends, so anything else is a
``bad_image`` row saying what it is. The size cap is checked on the name, then on the
opened file, and again while reading (a file may grow). The pool is a ``DaemonPool``:
a job that runs past ``--image-timeout`` (a hung network mount) fails its row and its
thread is written off, and no stuck thread can keep the process alive after a signal.
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import RowFailed
from ..records import ManifestRow, PreparedImage
from .pool import DaemonPool, JobTimeout, PoolExhausted
from .prepare import ImagePolicy, ImageProblem, Prepared, b64_len, prepare, sniff_mime

__all__ = ["ImageSource", "ReadLimits", "b64_len", "default_executor", "read_file",
           "sniff_mime"]

MiB = 1024 * 1024


class Fetcher(Protocol):
    async def fetch(self, url: str) -> bytes: ...


@dataclass(frozen=True)
class ReadLimits:
    max_bytes: int = 256 * MiB   # --max-file-bytes
    timeout: float = 60.0        # --image-timeout: one image's read and preparation


def default_executor() -> DaemonPool:
    return DaemonPool(os.cpu_count() or 2, name="image")


_shared: DaemonPool | None = None
_shared_lock = threading.Lock()


def _shared_pool() -> DaemonPool:
    """For an ImageSource built without a pool (tests, tools): one per process."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = default_executor()
        return _shared


class ImageSource:
    """Resolves a manifest row's ``image`` into a ``PreparedImage``."""

    def __init__(self, base_dir: Path, policy: ImagePolicy, executor: DaemonPool | None = None,
                 fetcher: Fetcher | None = None, limits: ReadLimits | None = None) -> None:
        self.base_dir = base_dir
        self.policy = policy
        self.executor = executor
        self.fetcher = fetcher
        self.limits = limits or ReadLimits()

    async def load(self, row: ManifestRow) -> PreparedImage:
        ref = row.image
        if "\x00" in ref:  # no file system or URL parser takes it: the manifest cell is bad
            raise RowFailed(f"image reference contains a NUL byte: {ref!r}", "bad_input")
        if ref.lower().startswith(("http://", "https://")):
            if self.fetcher is None:
                return PreparedImage(ref, None, None)
            data = await self.fetcher.fetch(ref)
            return await self._in_pool(ref, self._prepare, data, ref)
        return await self._in_pool(ref, self._load_local, ref)

    async def _in_pool(self, ref: str, fn: Callable[..., PreparedImage], *args: object
                       ) -> PreparedImage:
        pool = self.executor or _shared_pool()
        timeout = self.limits.timeout
        try:
            return await asyncio.wrap_future(pool.submit_bounded(timeout, fn, *args))
        except JobTimeout:
            raise RowFailed(f"reading and preparing the image took longer than {timeout:g} s "
                            f"(--image-timeout; a hung file system?): {ref}",
                            "bad_image") from None
        except PoolExhausted as e:
            raise RowFailed(f"image not read: {e} (--image-timeout {timeout:g} s; a hung "
                            f"file system?): {ref}", "bad_image") from None

    def resolve(self, ref: str) -> Path:
        p = Path(ref)
        try:
            p = p.expanduser()
        except RuntimeError:  # "~nobody/x" with no such user: the name as written
            pass
        return p if p.is_absolute() else self.base_dir / p

    def _load_local(self, ref: str) -> PreparedImage:
        path = self.resolve(ref)
        return self._prepare(read_file(path, self.limits.max_bytes), str(path))

    def _prepare(self, data: bytes, where: str) -> PreparedImage:
        try:
            p: Prepared = prepare(data, self.policy)
        except ImageProblem as e:
            raise RowFailed(f"{e}: {where}", "bad_image") from None
        uri = f"data:{p.mime};base64," + base64.b64encode(p.data).decode("ascii")
        return PreparedImage(uri, p.mime, len(p.data), p.sent_width, p.sent_height,
                             p.width, p.height, p.sha256)


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes``; else ``RowFailed``."""
    try:
        _check(os.stat(path), path, max_bytes)  # rejected before any open(): no side effects
        # O_NONBLOCK: should the name now be a FIFO, open() returns instead of waiting
        # for a writer; the descriptor is checked again below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RowFailed(f"image file not found: {path}", "bad_image") from None
    except OSError as e:
        raise RowFailed(f"image file unreadable: {path} ({e.strerror})", "bad_image") from None
    try:
        st = os.fstat(fd)
        _check(st, path, max_bytes)  # the file opened, not merely the name checked
        os.set_blocking(fd, True)
        return _read_capped(fd, st.st_size, max_bytes, path)
    except OSError as e:
        raise RowFailed(f"image file unreadable: {path} ({e.strerror})", "bad_image") from None
    finally:
        os.close(fd)


def _check(st: os.stat_result, path: Path, max_bytes: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise RowFailed(f"image path is a directory: {path}", "bad_image")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
        raise RowFailed(f"image path is {kind}, not a regular file: {path}", "bad_image")
    if st.st_size > max_bytes:
        raise RowFailed(f"image file too large: {st.st_size} bytes > {max_bytes} "
                        f"(--max-file-bytes): {path}", "bad_image")


def _read_capped(fd: int, size: int, max_bytes: int, path: Path) -> bytes:
    # The first read asks for the whole file plus one byte, so a regular file is read in
    # one call into one buffer (no copy); later reads only happen if it was short or the
    # file grew, and stop one byte past the cap.
    want = min(size, max_bytes) + 1
    parts: list[bytes] = []
    total = 0
    while chunk := os.read(fd, want):
        parts.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise RowFailed(f"image file grew past {max_bytes} bytes (--max-file-bytes) "
                            f"while being read: {path}", "bad_image")
        want = min(MiB, max_bytes + 1 - total)
    return parts[0] if len(parts) == 1 else b"".join(parts)
