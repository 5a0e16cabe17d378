"""An image host for ``--fetch-urls``: scripted routes, and how many downloads at once.

``ImageHost.add(path, body, ...)`` serves ``body`` at ``path`` (a content type, statuses
to answer first, a delay, chunked or with a length); every request is recorded with the
Host it named, its status and its outcome (``client_gone``: the client gave up on it),
and ``peak`` counts the most concurrent requests per Host.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .server import Exchange, LoopbackServer, Seen

__all__ = ["ImageHost", "Route"]


@dataclass
class Route:
    body: bytes
    ctype: str | None = "image/jpeg"
    statuses: list[int] = field(default_factory=list)  # served first, one per hit; then 200
    delay: float = 0.0
    chunked: bool = False       # stream the body without a Content-Length


class ImageHost(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, Route] = {}
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_total = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, path: str, body: bytes, **options: Any) -> str:
        self.images[path] = Route(body, **options)
        return self.url(path)

    @property
    def hits(self) -> list[Seen]:
        return self.requests()

    def count(self, path: str | None = None) -> int:  # type: ignore[override]
        return sum(1 for h in self.requests() if path is None or h.path == path)

    async def dispatch(self, ex: Exchange) -> web.StreamResponse:
        rec = ex.rec
        route = self.images.get(rec.path)
        rec.status = 404 if route is None else (route.statuses.pop(0) if route.statuses
                                                else 200)
        with self._lock:
            self.active[rec.host] = self.active.get(rec.host, 0) + 1
            self.peak[rec.host] = max(self.peak.get(rec.host, 0), self.active[rec.host])
            self.peak_total = max(self.peak_total, sum(self.active.values()))
        try:
            if route is not None and route.delay:
                await asyncio.sleep(route.delay)
            if route is None or rec.status != 200:
                return web.Response(status=rec.status, text=f"HTTP {rec.status}",
                                    content_type="text/plain")
            headers = {"Content-Type": route.ctype} if route.ctype else {}
            if not route.chunked:
                return web.Response(body=route.body, headers=headers)
            resp = web.StreamResponse(headers=headers)
            resp.enable_chunked_encoding()
            await resp.prepare(ex.request)
            for i in range(0, len(route.body), 1 << 16):
                await resp.write(route.body[i:i + (1 << 16)])
            return await ex.end(resp)
        finally:
            with self._lock:
                self.active[rec.host] -= 1
