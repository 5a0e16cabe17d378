"""The only module that imports aiohttp: one session, one POST, a byte stream out.

Library exceptions are translated once, here, into ``errors`` classes (keeping the
cause). The read timeout is an idle timeout between chunks (aiohttp ``sock_read``),
not a total timeout, so long captions are never cut. The API key is added to the
headers at send time and appears nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from .errors import Retryable, RowFailed, RunFatal, classify_http
from .records import ApiRequest
from .retry import RetryPolicy

__all__ = ["Head", "ImageFetcher", "Transport"]

_REQUEST_ID_HEADERS = ("x-request-id", "request-id", "x-litellm-call-id", "cf-ray")
_MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: Mapping[str, str]

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    @property
    def request_id(self) -> str | None:
        for name in _REQUEST_ID_HEADERS:
            if name in self.headers:
                return self.headers[name]
        return None


@contextmanager
def _mapped(read_timeout: float) -> Iterator[None]:
    """Translate aiohttp/OS failures into retryable pipeline errors."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as e:
        raise Retryable("connect timeout", "timeout") from e
    except (aiohttp.ServerTimeoutError, TimeoutError) as e:
        raise Retryable(f"no data from the server for {read_timeout:g} s", "timeout") from e
    except aiohttp.ClientPayloadError as e:
        raise Retryable("connection closed mid-response", "connection") from e
    except aiohttp.InvalidURL as e:
        raise RunFatal(f"invalid endpoint URL: {e}", "config", exit_code=2) from e
    except (aiohttp.ClientError, OSError) as e:
        raise Retryable(f"connection error: {type(e).__name__}: {e}", "connection") from e


class Transport:
    """An aiohttp session sized to the concurrency; use as an async context manager."""

    def __init__(self, base_url: str, auth_headers: Mapping[str, str], concurrency: int,
                 connect_timeout: float, read_timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = dict(auth_headers)
        self._read_timeout = read_timeout
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                              sock_read=read_timeout)
        self._limit = concurrency
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Transport:
        connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=self._limit,
                                         enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                              auto_decompress=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @asynccontextmanager
    async def open(self, req: ApiRequest) -> AsyncIterator[tuple[Head, AsyncIterator[bytes]]]:
        """POST the request; yield the response head and an iterator over body bytes."""
        assert self._session is not None, "Transport used outside 'async with'"
        headers = {"Content-Type": "application/json", **req.headers, **self._auth}
        url = self.base_url + req.path
        with _mapped(self._read_timeout):
            resp = await self._session.post(url, data=req.body, headers=headers)
        chunks = self._chunks(resp)
        try:
            head = Head(resp.status, {k.lower(): v for k, v in resp.headers.items()})
            yield head, chunks
        finally:
            # Closed here, not by the garbage collector's async-generator hook (which
            # costs an extra wake-up of the event loop per request).
            await chunks.aclose()
            if resp.content.at_eof():
                resp.release()  # fully read: the connection goes back to the pool
            else:
                resp.close()  # abandoned mid-body: the connection cannot be reused

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        with _mapped(self._read_timeout):
            async for chunk in resp.content.iter_any():
                yield chunk

    async def read_body(self, chunks: AsyncIterator[bytes]) -> bytes:
        """A whole (error or JSON) body, capped so a huge page cannot fill memory."""
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:
            parts.append(chunk)
            size += len(chunk)
            if size >= _MAX_ERROR_BODY:
                break
        return b"".join(parts)


class ImageFetcher:
    """Downloads images for ``--fetch-urls``: size cap, timeout, type check, retries.

    Its own session, so the API key can never reach an image host, and a cap on
    parallel downloads per host, so one slow site cannot hold every worker.
    """

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
        host = urlsplit(url).hostname or ""
        gate = self._hosts.setdefault(host, asyncio.Semaphore(self.per_host))
        attempts = 0
        while True:
            attempts += 1
            try:
                async with gate:
                    return await self._get(url)
            except Retryable as e:
                if not self.policy.may_retry(attempts):
                    raise RowFailed(f"image download failed after {attempts} attempts: "
                                    f"{e.message}: {url}", "bad_image") from None
                await self.sleep(self.policy.next_delay(attempts, e.retry_after))

    async def _get(self, url: str) -> bytes:
        assert self._session is not None, "ImageFetcher used outside 'async with'"
        with _mapped(self.timeout.total or 0):
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    err = classify_http(resp.status, resp.headers, b"")
                    if isinstance(err, Retryable):
                        raise err
                    raise RowFailed(f"image download failed: HTTP {resp.status}: {url}",
                                    "bad_image")
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype and not ctype.startswith("image/") and ctype not in _BINARY_TYPES:
                    raise RowFailed(f"not an image: {url} answered with content-type "
                                    f"{ctype}", "bad_image")
                if (resp.content_length or 0) > self.max_bytes:
                    raise self._too_big(url)
                return await self._read_capped(resp, url)

    async def _read_capped(self, resp: aiohttp.ClientResponse, url: str) -> bytes:
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


_BINARY_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
