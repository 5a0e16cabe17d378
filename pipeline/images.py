"""Image references → what is sent, prepared off the event loop.

Local files (and, with ``--fetch-urls``, downloaded URLs) are read and prepared by
``imageprep.prepare`` in a thread pool sized to the cores: Pillow releases the GIL
while it decodes, resizes and encodes, so streams keep flowing while images are
prepared. Without ``--fetch-urls`` a URL is passed through for the provider to fetch.
Every local problem is a ``RowFailed`` with class ``bad_image``.
"""

from __future__ import annotations

import asyncio
import base64
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from .errors import RowFailed
from .imageprep import ImagePolicy, ImageProblem, Prepared, b64_len, prepare, sniff_mime
from .records import ManifestRow, PreparedImage

__all__ = ["ImageSource", "b64_len", "default_executor", "sniff_mime"]


class Fetcher(Protocol):
    async def fetch(self, url: str) -> bytes: ...


def default_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="image")


class ImageSource:
    """Resolves a manifest row's ``image`` into a ``PreparedImage``."""

    def __init__(self, base_dir: Path, policy: ImagePolicy, executor: Executor | None = None,
                 fetcher: Fetcher | None = None) -> None:
        self.base_dir = base_dir
        self.policy = policy
        self.executor = executor
        self.fetcher = fetcher

    async def load(self, row: ManifestRow) -> PreparedImage:
        ref = row.image
        loop = asyncio.get_running_loop()
        if ref.lower().startswith(("http://", "https://")):
            if self.fetcher is None:
                return PreparedImage(ref, None, None)
            data = await self.fetcher.fetch(ref)
            return await loop.run_in_executor(self.executor, self._prepare, data, ref)
        return await loop.run_in_executor(self.executor, self._load_local, ref)

    def resolve(self, ref: str) -> Path:
        p = Path(ref).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def _load_local(self, ref: str) -> PreparedImage:
        path = self.resolve(ref)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RowFailed(f"image file not found: {path}", "bad_image") from None
        except IsADirectoryError:
            raise RowFailed(f"image path is a directory: {path}", "bad_image") from None
        except OSError as e:
            raise RowFailed(f"image file unreadable: {path} ({e.strerror})", "bad_image") from None
        return self._prepare(data, str(path))

    def _prepare(self, data: bytes, where: str) -> PreparedImage:
        try:
            p: Prepared = prepare(data, self.policy)
        except ImageProblem as e:
            raise RowFailed(f"{e}: {where}", "bad_image") from None
        uri = f"data:{p.mime};base64," + base64.b64encode(p.data).decode("ascii")
        return PreparedImage(uri, p.mime, len(p.data), p.sent_width, p.sent_height,
                             p.width, p.height, p.sha256)
