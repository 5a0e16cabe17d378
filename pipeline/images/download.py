"""Image downloads for ``--fetch-urls``: size cap, timeout, type check, retries, redirects.

Its own aiohttp session with no default headers, so API credentials can never reach an
image host. Redirects are followed here rather than by aiohttp, so that user-info is
stripped from every hop: ``http://user:password@host/a.jpg`` authenticates to that
host only, never to wherever it redirects (and a ``Location`` carrying user-info of
its own is not obeyed either). Error messages name the URL; the redactor removes its
password.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from yarl import URL

from ..errors import Retryable, RowFailed, classify_http
from ..pacing.retry import RetryPolicy
from ..wire.transport import mapped

__all__ = ["ImageFetcher"]

log = logging.getLogger("pipeline.download")

_BINARY_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_HOPS = 10


class ImageFetcher:
    """Downloads images; a cap on parallel downloads per host, so one slow site cannot
    hold every worker."""

    def __init__(self, policy: RetryPolicy, max_bytes: int, timeout: float,
                 per_host: int = 4, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
                 ) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 15.0))
        self.per_host = per_host
        self.sleep = sleep
        self._hosts: dict[str, asyncio.Semaphore] = {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ImageFetcher:
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str) -> bytes:
        try:
            target = URL(url)
        except ValueError:
            target = None
        if target is None or target.scheme not in ("http", "https") or not target.host:
            raise RowFailed(f"invalid image URL: {url!r}", "bad_input")
        gate = self._hosts.setdefault(target.host, asyncio.Semaphore(self.per_host))
        attempts = 0
        while True:
            attempts += 1
            try:
                async with gate:
                    return await self._get(target, url)
            except Retryable as e:
                if not self.policy.may_retry(attempts):
                    raise RowFailed(f"image download failed after {attempts} attempts: "
                                    f"{e.message}: {url}", "bad_image") from None
                delay = self.policy.next_delay(attempts, e.retry_after)
                log.debug("image download %s: attempt %d failed (%s: %s); retrying in %.2f s",
                          url, attempts, e.error_class, e.message, delay)
                await self.sleep(delay)

    async def _get(self, target: URL, url: str) -> bytes:
        assert self._session is not None, "ImageFetcher used outside 'async with'"
        total = self.timeout.total or 0
        try:
            async with asyncio.timeout(total):  # one deadline, redirects included
                for _ in range(_MAX_HOPS + 1):
                    with mapped(total):
                        try:
                            async with self._session.get(target, allow_redirects=False
                                                         ) as resp:
                                if resp.status not in _REDIRECTS:
                                    return await self._body(resp, url)
                                target = _next_hop(resp, target, url)
                        except aiohttp.InvalidURL as e:
                            raise RowFailed(f"invalid image URL: {url!r}", "bad_input") from e
        except TimeoutError:
            raise Retryable(f"download took longer than {total:g} s", "timeout") from None
        raise RowFailed(f"image download redirected more than {_MAX_HOPS} times: {url}",
                        "bad_image")

    async def _body(self, resp: aiohttp.ClientResponse, url: str) -> bytes:
        if resp.status != 200:
            err = classify_http(resp.status, resp.headers, b"")
            if isinstance(err, Retryable):
                raise err
            raise RowFailed(f"image download failed: HTTP {resp.status}: {url}", "bad_image")
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and not ctype.startswith("image/") and ctype not in _BINARY_TYPES:
            raise RowFailed(f"not an image: {url} answered with content-type {ctype}",
                            "bad_image")
        if (resp.content_length or 0) > self.max_bytes:
            raise self._too_big(url)
        parts: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_big(url)
            parts.append(chunk)
        return b"".join(parts)

    def _too_big(self, url: str) -> RowFailed:
        return RowFailed(f"image download larger than {self.max_bytes} bytes: {url}",
                         "bad_image")


def _next_hop(resp: aiohttp.ClientResponse, current: URL, url: str) -> URL:
    raw = resp.headers.get("Location")
    if not raw:
        raise RowFailed(f"image download failed: HTTP {resp.status} without a Location: "
                        f"{url}", "bad_image")
    try:
        target = current.join(URL(raw)).with_user(None)  # no credentials onward
    except ValueError:
        target = None
    if target is None or target.scheme not in ("http", "https") or not target.host:
        raise RowFailed(f"image download redirected to an unusable location "
                        f"{raw[:200]!r}: {url}", "bad_image")
    return target
