"""The transport seam: what the worker needs of an HTTP exchange, and an in-memory one.

``Channel`` is the protocol: ``open(request)`` is an async context manager giving the
response ``Head`` and an iterator over the body's byte chunks (translated errors only:
``errors.Retryable`` and friends, never a library's own), and ``read_body`` reads an
error body up to a cap. ``wire.transport.Transport`` is the aiohttp implementation;
``ScriptedTransport`` answers from a script in memory, for tests of the worker at the
seam (the wire itself is tested against real loopback servers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from ..records import ApiRequest

__all__ = ["Channel", "Head", "MAX_ERROR_BODY", "ScriptedTransport", "read_capped"]

_REQUEST_ID_HEADERS = ("x-request-id", "request-id", "x-litellm-call-id", "cf-ray")
MAX_ERROR_BODY = 64 * 1024  # an error page is read this far: enough for any message


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: Mapping[str, str]  # lower-case names, values decoded safely

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    @property
    def request_id(self) -> str | None:
        for name in _REQUEST_ID_HEADERS:
            if name in self.headers:
                return self.headers[name]
        return None


class Channel(Protocol):
    def open(self, req: ApiRequest
             ) -> AbstractAsyncContextManager[tuple[Head, AsyncIterator[bytes]]]: ...

    async def read_body(self, chunks: AsyncIterator[bytes],
                        limit: int = MAX_ERROR_BODY) -> bytes: ...


async def read_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A body read up to ``limit`` bytes, so a huge page cannot fill memory."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


Step = tuple[int, Mapping[str, str], Sequence[bytes | BaseException]] | BaseException


class ScriptedTransport:
    """A ``Channel`` that answers each request with the next step of a script: an
    exception to raise at once, or (status, headers, chunks) where a chunk that is an
    exception is raised mid-body. ``sent`` records every request."""

    def __init__(self, script: Sequence[Step]) -> None:
        self.script: list[Any] = list(script)
        self.sent: list[ApiRequest] = []

    @asynccontextmanager
    async def open(self, req: ApiRequest) -> AsyncIterator[tuple[Head, AsyncIterator[bytes]]]:
        self.sent.append(req)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        status, headers, chunks = step

        async def body() -> AsyncIterator[bytes]:
            for c in chunks:
                if isinstance(c, BaseException):
                    raise c
                yield c

        yield Head(status, {k.lower(): v for k, v in headers.items()}), body()

    async def read_body(self, chunks: AsyncIterator[bytes],
                        limit: int = MAX_ERROR_BODY) -> bytes:
        return await read_capped(chunks, limit)
