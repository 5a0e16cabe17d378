"""The API side of aiohttp: one session, one POST, a byte stream out.

Library exceptions are translated once, here, into ``errors`` classes (keeping the
cause). The read timeout is an idle timeout between chunks (aiohttp ``sock_read``),
not a total timeout, so long captions are never cut (the worker holds the optional
total deadline). The API key is added to the headers at send time and is registered
with the redactor, so no message can carry it.

Two things the library does not do the way a batch client needs:

* **Redirects** are never followed blindly: aiohttp would turn a POST answered with
  301/302 into a GET (every row then fails as "HTTP 405"), and on a 307 to another
  origin it strips ``Authorization`` but not ``x-api-key``. Only a same-origin 307/308
  is followed, with the body and credentials; any other redirect stops the run with
  one line naming the target.
* **A stale pooled connection** (the server closed it while idle, and our request
  crossed its FIN) fails before any response byte. Such a request is sent again at
  once on a fresh connection and costs no attempt; only a failure on a fresh
  connection reaches the retry policy (as urllib3 and httpx do).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from yarl import URL

from ..errors import Retryable, RunFatal
from ..records import ApiRequest
from ..redact import add_secret
from .channel import MAX_ERROR_BODY, Head, read_capped

__all__ = ["Head", "Transport", "Upload", "mapped", "MAX_ERROR_BODY"]

log = logging.getLogger("pipeline.transport")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "x-goog-api-key"})
_MAX_HOPS = 5
# Failures of a request on a connection the server had already closed. A connect
# error (ClientConnectorError) cannot happen on a reused connection and is excluded.
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
          aiohttp.ClientConnectionResetError)


@contextmanager
def mapped(read_timeout: float) -> Iterator[None]:
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
        raise Retryable(f"connection error: {type(e).__name__}: {e}", "connection",
                        endpoint=_endpoint_reason(e)) from e


def _endpoint_reason(e: BaseException) -> str | None:
    """Failures that say the endpoint itself is wrong, not that this attempt was unlucky."""
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return "dns"
    if isinstance(e, aiohttp.ClientSSLError):
        return "tls"
    if isinstance(e, aiohttp.ClientConnectorError) and isinstance(e.os_error,
                                                                  ConnectionRefusedError):
        return "refused"
    return None


@dataclass(frozen=True)
class Upload:
    """A multipart file upload: form ``fields`` and the file, streamed from disk."""

    path: Path
    filename: str
    fields: dict[str, str] = field(default_factory=dict)


async def _on_reuse(session: Any, ctx: SimpleNamespace, params: Any) -> None:
    ctx.trace_request_ctx.reused = True


class Transport:
    """An aiohttp session sized to the concurrency; use as an async context manager."""

    def __init__(self, base_url: str, auth_headers: Mapping[str, str], concurrency: int,
                 connect_timeout: float, read_timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = dict(auth_headers)
        for name, value in self._auth.items():  # "Bearer KEY": the key alone too
            if name.lower() in _CREDENTIAL_HEADERS:  # not anthropic-version
                add_secret(value)
                add_secret(value.partition(" ")[2])
        self._read_timeout = read_timeout
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                              sock_read=read_timeout)
        self._limit = concurrency
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self.fresh_resends = 0  # requests resent because a pooled connection was stale

    async def __aenter__(self) -> Transport:
        trace = aiohttp.TraceConfig()
        trace.on_connection_reuseconn.append(_on_reuse)
        connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=self._limit,
                                         enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                              auto_decompress=True, trace_configs=[trace])
        # Resends after a stale connection: never pooled, so always a new connection.
        self._fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._limit, force_close=True),
            timeout=self._timeout, auto_decompress=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()

    @asynccontextmanager
    async def open(self, req: ApiRequest) -> AsyncIterator[tuple[Head, AsyncIterator[bytes]]]:
        """POST the request; yield the response head and an iterator over body bytes."""
        assert self._session is not None, "Transport used outside 'async with'"
        headers = {"Content-Type": "application/json", **req.headers, **self._auth}
        resp = await self._send(self.base_url + req.path, req, headers)
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

    @asynccontextmanager
    async def call(self, method: str, path: str, *, body: bytes | AsyncIterator[bytes] | None
                   = None, upload: Upload | None = None, url: str | None = None
                   ) -> AsyncIterator[tuple[Head, AsyncIterator[bytes]]]:
        """Any other API call (the batch lane's files and batches): ``method`` on
        ``{base}{path}`` (or on ``url``, the same origin, e.g. a results URL), a JSON
        ``body`` (bytes, or streamed from an async iterator), or a multipart ``upload``
        streamed from its file. No redirect is followed (the batch endpoints have none)."""
        assert self._session is not None, "Transport used outside 'async with'"
        target = url or self.base_url + path
        if URL(target).origin() != URL(self.base_url).origin():
            raise RunFatal(f"refusing to send credentials to {URL(target).origin()} "
                           f"(not the origin of --base-url)", "redirect")
        headers = {**self._auth}
        data: Any = body
        with contextlib.ExitStack() as files, mapped(self._read_timeout):
            if upload is not None:
                form = aiohttp.FormData()
                for name, value in upload.fields.items():
                    form.add_field(name, value)
                form.add_field("file", files.enter_context(upload.path.open("rb")),
                               filename=upload.filename, content_type="application/jsonl")
                data = form
            elif body is not None:
                headers["Content-Type"] = "application/json"
            resp = await self._session.request(method, target, data=data, headers=headers,
                                               allow_redirects=False,
                                               trace_request_ctx=SimpleNamespace(reused=False))
        chunks = self._chunks(resp)
        try:
            yield Head(resp.status, {k.lower(): v for k, v in resp.headers.items()}), chunks
        finally:
            await chunks.aclose()
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()

    async def _send(self, url: str, req: ApiRequest, headers: dict[str, str]
                    ) -> aiohttp.ClientResponse:
        """The response, after following same-origin 307/308 redirects only."""
        for _ in range(_MAX_HOPS + 1):
            resp = await self._post(url, req.body, headers)
            if resp.status not in _REDIRECTS:
                return resp
            status, target = resp.status, _location(resp, url)
            await self._discard(resp)
            if status in (307, 308) and URL(url).origin() == target.origin():
                log.debug("HTTP %d: following the same-origin redirect to %s", status, target)
                url = str(_with_userinfo(target, URL(url)))
                continue
            raise _redirect_fatal(status, target, req.path)
        raise RunFatal(f"the endpoint redirects more than {_MAX_HOPS} times (last to {url}); "
                       "check --base-url", "redirect")

    async def _post(self, url: str, body: bytes, headers: dict[str, str]
                    ) -> aiohttp.ClientResponse:
        assert self._session is not None and self._fresh is not None
        probe = SimpleNamespace(reused=False)
        with mapped(self._read_timeout):
            try:
                return await self._session.post(url, data=body, headers=headers,
                                                allow_redirects=False,
                                                trace_request_ctx=probe)
            except _STALE as e:
                if not probe.reused or isinstance(e, aiohttp.ClientConnectorError):
                    raise
                log.debug("a pooled connection was closed by the server before it answered "
                          "(%s); resending at once on a fresh connection", type(e).__name__)
                self.fresh_resends += 1
            return await self._fresh.post(url, data=body, headers=headers,
                                          allow_redirects=False)

    async def _discard(self, resp: aiohttp.ClientResponse) -> None:
        """Drop a redirect's body; keep the connection if the body is small."""
        if resp.content_length is not None and resp.content_length <= MAX_ERROR_BODY:
            with mapped(self._read_timeout):
                await resp.read()
            resp.release()
        else:
            resp.close()

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
        with mapped(self._read_timeout):
            async for chunk in resp.content.iter_any():
                yield chunk

    async def read_body(self, chunks: AsyncIterator[bytes], limit: int = MAX_ERROR_BODY
                        ) -> bytes:
        """An error body, read up to ``limit`` bytes so a huge page cannot fill memory."""
        return await read_capped(chunks, limit)


def _location(resp: aiohttp.ClientResponse, url: str) -> URL:
    raw = resp.headers.get("Location")
    if not raw:
        raise RunFatal(f"the endpoint answered HTTP {resp.status} without a Location "
                       f"header ({url}); check --base-url", "redirect")
    try:
        target = URL(url).join(URL(raw))
        target.origin()  # raises for a target without scheme or host
    except ValueError:
        raise RunFatal(f"the endpoint redirects (HTTP {resp.status}) to an invalid location "
                       f"{raw[:200]!r}; check --base-url", "redirect") from None
    return target.with_user(None)


def _with_userinfo(target: URL, origin: URL) -> URL:
    """Same-origin only: the user-info of --base-url, never one a server sent."""
    if origin.user is None:
        return target
    return target.with_user(origin.user).with_password(origin.password)


def _redirect_fatal(status: int, target: URL, path: str) -> RunFatal:
    shown = str(target)
    bare = str(target.with_query(None).with_fragment(None))
    base = bare[:-len(path)] if path and bare.endswith(path) else None
    hint = f"use {base} as --base-url" if base else "check --base-url"
    return RunFatal(f"the endpoint redirects to {shown} (HTTP {status}); {hint}", "redirect")
