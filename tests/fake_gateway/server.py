"""The loopback HTTP server every fake server of the tests is made of.

``LoopbackServer`` runs aiohttp on 127.0.0.1 in a background thread with its own event
loop, so the client under test can run its own ``asyncio.run`` in the test thread.
Every request is recorded (``Seen``) before its handler runs; the handler gets an
``Exchange``: the request, its record, and writers for bodies that end cleanly, are
cut (FIN, or RST), or go silent. Handlers come from a route table (``"POST /path"`` or
``"/path"``) or one catch-all ``handler``; a subclass may choose its own (``dispatch``).

``RawServer`` answers every request with fixed bytes from a bare asyncio server, for
the answers aiohttp refuses to write (a 0xff byte in a header value).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["SERVER_LOG", "Exchange", "Handler", "LoopbackServer", "RawServer", "Seen"]

# The test servers' own errors (a client that hung up mid-write) stay out of the
# client's captured stderr, where tests count lines: they are the server's noise.
SERVER_LOG = logging.getLogger("tests.server")
SERVER_LOG.propagate = False
SERVER_LOG.addHandler(logging.NullHandler())

MAX_BODY = 256 * 1024 * 1024  # request bodies (inline images) the servers accept


@dataclass
class Seen:
    """One HTTP request as a server saw it, and how its answer went."""

    t: float                      # time.monotonic() at arrival (body read)
    method: str
    path: str
    host: str                     # the Host header without the port
    headers: dict[str, str]
    raw: bytes                    # the request body
    status: int | None = None
    outcome: str = "pending"      # ok / error / cut / reset / stalled / client_gone
    t_end: float | None = None    # time.monotonic() when the answer ended

    def json(self) -> Any:
        return json.loads(self.raw)


class Exchange:
    """One request and its answer: what a handler gets."""

    def __init__(self, server: LoopbackServer, request: web.Request, rec: Seen) -> None:
        self.server = server
        self.request = request
        self.rec = rec

    def base_headers(self) -> dict[str, str]:
        """Headers every answer of this server carries."""
        return {}

    def stall_seconds(self) -> float:
        return 30.0

    def _ended(self, outcome: str) -> None:
        self.rec.outcome = outcome
        self.rec.t_end = time.monotonic()

    async def start_stream(self, status: int = 200, headers: dict[str, str] | None = None,
                           content_type: str = "text/event-stream") -> web.StreamResponse:
        h = {"Content-Type": content_type, "Cache-Control": "no-cache", **self.base_headers()}
        h.update(headers or {})
        resp = web.StreamResponse(status=status, headers=h)
        self.rec.status = status
        await resp.prepare(self.request)
        return resp

    async def write(self, resp: web.StreamResponse, data: bytes, *, chunk_size: int = 0,
                    pause: float = 0.0) -> None:
        """Write ``data`` in pieces of ``chunk_size`` bytes (0 = one piece)."""
        step = chunk_size or len(data) or 1
        for i in range(0, len(data), step):
            await resp.write(data[i:i + step])
            if pause:
                await asyncio.sleep(pause)

    async def write_pieces(self, resp: web.StreamResponse, pieces: list[bytes | float],
                           pause: float = 0.0) -> None:
        """Write each piece separately; a number sleeps that many seconds."""
        for p in pieces:
            if isinstance(p, (int, float)):
                await asyncio.sleep(p)
                continue
            await resp.write(p)
            if pause:
                await asyncio.sleep(pause)

    async def end(self, resp: web.StreamResponse, outcome: str = "ok") -> web.StreamResponse:
        """Clean end of the body (chunked terminator, then keep-alive or close)."""
        await resp.write_eof()
        self._ended(outcome)
        return resp

    async def cut(self, resp: web.StreamResponse, *, rst: bool = False) -> web.StreamResponse:
        """Close the TCP connection mid-body: FIN after flushing (or RST if ``rst``)."""
        transport = self.request.transport
        await asyncio.sleep(0.02)  # let the last write reach the socket first
        if transport is not None:
            if rst:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            else:
                transport.close()
        self._ended("reset" if rst else "cut")
        return resp

    async def stall(self, seconds: float = 30.0) -> bool:
        """Send nothing for ``seconds`` (outcome ``stalled`` meanwhile). True, with
        outcome ``client_gone``, when the client hung up first; False when the time
        ran out or the server stops."""
        self.rec.outcome = "stalled"
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and not self.server.stopping:
                t = self.request.transport
                if t is None or t.is_closing():
                    self.rec.outcome = "client_gone"
                    return True
                await asyncio.sleep(0.02)
            return False
        finally:
            self.rec.t_end = time.monotonic()

    async def sse_response(self, body: bytes | list[bytes | float], *, chunk_size: int = 0,
                           pause: float = 0.0, end: str = "eof",
                           headers: dict[str, str] | None = None) -> web.StreamResponse:
        """200 text/event-stream; ``end`` is eof (clean), cut (FIN), reset (RST), stall."""
        resp = await self.start_stream(200, headers)
        if isinstance(body, bytes):
            await self.write(resp, body, chunk_size=chunk_size, pause=pause)
        else:
            await self.write_pieces(resp, body, pause=pause)
        if end == "eof":
            return await self.end(resp, "ok")
        if end == "cut":
            return await self.cut(resp)
        if end == "reset":
            return await self.cut(resp, rst=True)
        if end == "stall":
            if await self.stall(self.stall_seconds()):
                return resp
            return await self.cut(resp)
        raise ValueError(end)

    async def json_response(self, status: int, obj: Any, *, headers: dict[str, str] | None = None,
                            content_type: str = "application/json") -> web.StreamResponse:
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        h = {"Content-Type": content_type, **self.base_headers(), **(headers or {})}
        resp = web.Response(status=status, body=raw, headers=h)
        self.rec.status = status
        await resp.prepare(self.request)
        await resp.write_eof()
        self._ended("ok" if status < 400 else "error")
        return resp


Handler = Callable[[Any], Awaitable[web.StreamResponse]]  # (Exchange or a subclass)


class _Threaded:
    """An event loop of its own in a daemon thread, for a server object."""

    def __init__(self, name: str) -> None:
        self.stopping = False
        self.port = 0
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> Any:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self._name,
                                        daemon=True)
        self._thread.start()
        self._run(self._open())
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self.stopping = True
        try:
            self._run(self._close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread:
                self._thread.join(10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


class LoopbackServer(_Threaded):
    """aiohttp on 127.0.0.1: records every request, then answers it from ``routes``
    (``"POST /v1/x"`` before ``"/v1/x"``) or ``handler``; 404 otherwise."""

    exchange = Exchange

    def __init__(self, handler: Handler | None = None,
                 routes: dict[str, Handler] | None = None) -> None:
        super().__init__(type(self).__name__)
        self.handler = handler
        self.routes: dict[str, Handler] = dict(routes or {})
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None

    # -- queries -------------------------------------------------------------
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def count(self) -> int:
        return len(self.requests())

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    # -- what subclasses may change ---------------------------------------------
    def record(self, request: web.Request, raw: bytes) -> Seen:
        """The record of a request (called under the lock, in arrival order)."""
        return Seen(time.monotonic(), request.method, request.path, _host(request),
                    dict(request.headers), raw)

    async def dispatch(self, ex: Exchange) -> web.StreamResponse:
        r = ex.request
        handler = self.routes.get(f"{r.method} {r.path}") or self.routes.get(r.path) \
            or self.handler
        if handler is None:
            return await ex.json_response(404, {"error": {
                "message": f"no route {r.method} {r.path}", "code": "unknown_url"}})
        return await handler(ex)

    # -- the server ---------------------------------------------------------------
    async def _open(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     logger=SERVER_LOG, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        with self._lock:
            rec = self.record(request, raw)
            self.seen.append(rec)
        ex = self.exchange(self, request, rec)
        try:
            resp = await self.dispatch(ex)
            if not resp.prepared:  # a plain web.Response: send it now, to record its end
                await resp.prepare(request)
                await resp.write_eof()
                rec.status = resp.status
                ex._ended("ok" if resp.status < 400 else "error")
            return resp
        except asyncio.CancelledError:
            ex._ended("client_gone")
            raise


def _host(request: web.Request) -> str:
    return (request.host or "").rsplit(":", 1)[0]


class RawServer(_Threaded):
    """A bare HTTP/1.1 server on 127.0.0.1 that answers every request with ``response``
    (bytes, or a function of the request's record), keeping the connection open."""

    def __init__(self, response: bytes | Callable[[Seen], bytes]) -> None:
        super().__init__("raw-server")
        self.response = response
        self.seen: list[Seen] = []
        self._server: asyncio.Server | None = None

    def requests(self) -> list[Seen]:
        return list(self.seen)

    def count(self) -> int:
        return len(self.seen)

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, headers = _parse_head(head)
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                rec = Seen(time.monotonic(), method, path,
                           headers.get("host", "").rsplit(":", 1)[0], headers, body)
                self.seen.append(rec)
                answer = self.response(rec) if callable(self.response) else self.response
                writer.write(answer)
                await writer.drain()
                rec.status, rec.outcome, rec.t_end = int(answer.split()[1]), "ok", \
                    time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, path, headers
