"""A scriptable, fault-injecting OpenAI-compatible gateway for black-box wire tests.

It speaks ``POST /v1/chat/completions`` over real TCP on 127.0.0.1 and never imports
anything from ``pipeline`` (a client bug must not be mirrored by the server).

How a response is chosen
------------------------
The handler reads the request JSON and takes the ``image_url.url`` of the user message.
Tests use pass-through URLs such as ``http://img.test/C18/a.jpg?fail=2``:

* the first path segment is the *scenario* (``C18``); a suffix after the first ``-`` is
  its *variant* (``C17-refusal`` -> scenario ``C17``, variant ``refusal``);
* the query string carries knobs (``fail=N``: how many attempts fail before the
  scenario succeeds; ``pace``, ``n``, ``delay`` for slow streams);
* attempts are counted per URL, so "fail on attempt 1, succeed on attempt 2" stays
  deterministic however many rows run concurrently;
* a local image arrives as a ``data:`` URI and is served by the ``local`` scenario.

Every request is recorded (arrival time, end time, headers, body, attempt, status,
outcome) for assertions. Sections §1, §2, §5, §8 and §10 of docs/protocol.md are the
source of every byte sequence below; scenario names follow the conformance cases
C01..C40 (Anthropic-native C36-C38 and n=2 C16 are not implemented).

The server runs in a background thread with its own event loop (``Gateway.start``),
so the client under test can run its own ``asyncio.run`` in the test thread.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import socket
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

# The test server's own errors (a client that hung up mid-write) stay out of the
# client's captured stderr, where tests count lines: they are the server's noise.
SERVER_LOG = logging.getLogger("tests.server")
SERVER_LOG.propagate = False
SERVER_LOG.addHandler(logging.NullHandler())

MODEL = "gpt-4o-mini-2024-07-18"
RETRY_CAPTION = "Second attempt caption."
LOCAL_CAPTION = "A local image."
PARTIAL = ["PARTIAL-ONE", " PARTIAL-TWO"]  # text of failed attempts; must never be kept
USAGE_C01 = {"prompt_tokens": 1200, "completion_tokens": 7, "total_tokens": 1207,
             "prompt_tokens_details": {"cached_tokens": 0}}
USAGE_OK = {"prompt_tokens": 1000, "completion_tokens": 5, "total_tokens": 1005}


def img(scenario: str, name: str = "a.jpg", **query: Any) -> str:
    """A pass-through image URL that selects ``scenario`` (knobs go in the query)."""
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"http://img.test/{scenario}/{name}" + (f"?{q}" if q else "")


def default_caption(url: str) -> str:
    """The caption the ``ok``/``slow`` scenarios return for an image URL."""
    return f"Caption of {urlsplit(url).path}"


# --------------------------------------------------------------------------- chunks


def chunk(content: str | None = None, *, finish: str | None = None, role: bool = False,
          usage: Any = None, cid: str = "chatcmpl-fake01", model: str = MODEL,
          index: int = 0, delta: dict | None = None, with_usage_key: bool = True,
          **top: Any) -> dict:
    """One ``chat.completion.chunk`` with a single choice."""
    d: dict[str, Any] = dict(delta or {})
    if role:
        d["role"] = "assistant"
    if content is not None:
        d["content"] = content
    out: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": 1767225600, "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{"index": index, "delta": d, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage_key or usage is not None:
        out["usage"] = usage
    out.update(top)
    return out


def usage_chunk(usage: dict, *, cid: str = "chatcmpl-fake01") -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": 1767225600,
            "model": MODEL, "choices": [], "usage": usage}


def sse(obj: Any, *, nl: str = "\n", space: bool = True, ascii: bool = True) -> bytes:
    """One SSE event: ``data: <json>`` plus a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=ascii,
                                                       separators=(",", ":"))
    return f"data:{' ' if space else ''}{data}{nl}{nl}".encode()


def done(*, nl: str = "\n", space: bool = True) -> bytes:
    return sse("[DONE]", nl=nl, space=space)


def standard_events(texts: list[str], *, finish: str = "stop", usage: dict | None = USAGE_C01,
                    cid: str = "chatcmpl-fake01") -> list[dict]:
    """Role chunk, one chunk per text, finish chunk, usage chunk (if any)."""
    evs = [chunk("", role=True, cid=cid)]
    evs += [chunk(t, cid=cid) for t in texts]
    evs.append(chunk(None, finish=finish, cid=cid))
    if usage is not None:
        evs.append(usage_chunk(usage, cid=cid))
    return evs


def stream_body(texts: list[str], *, finish: str = "stop", usage: dict | None = USAGE_C01,
                with_done: bool = True, nl: str = "\n", space: bool = True,
                ascii: bool = True, cid: str = "chatcmpl-fake01") -> bytes:
    body = b"".join(sse(e, nl=nl, space=space, ascii=ascii)
                    for e in standard_events(texts, finish=finish, usage=usage, cid=cid))
    return body + (done(nl=nl, space=space) if with_done else b"")


def split_after(data: bytes, sep: bytes) -> list[bytes]:
    """Cut ``data`` just after every occurrence of ``sep`` (e.g. between CR and LF)."""
    out, start = [], 0
    while True:
        i = data.find(sep, start)
        if i < 0:
            break
        out.append(data[start:i + len(sep)])
        start = i + len(sep)
    if start < len(data):
        out.append(data[start:])
    return out


def http_date(seconds_ahead: float) -> str:
    return email.utils.formatdate(time.time() + seconds_ahead, usegmt=True)


# --------------------------------------------------------------------------- records


@dataclass
class Recorded:
    """One HTTP request as the server saw it."""

    t: float                      # time.monotonic() at arrival
    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any                     # parsed JSON, or None
    url: str | None               # the image_url.url of the user message
    scenario: str
    variant: str
    attempt: int                  # 1-based, per url
    status: int | None = None
    outcome: str = "pending"      # ok / error / aborted / reset / stalled / ...
    t_end: float | None = None    # time.monotonic() when the response ended

    @property
    def user_content(self) -> list:
        for m in (self.body or {}).get("messages", []):
            if m.get("role") == "user":
                return m.get("content") or []
        return []

    @property
    def prompt_text(self) -> str | None:
        for part in self.user_content:
            if isinstance(part, dict) and part.get("type") == "text":
                return part.get("text")
        return None


@dataclass
class Ctx:
    """What a scenario handler gets: the request, its record and response helpers."""

    gw: "Gateway"
    request: web.Request
    rec: Recorded
    query: dict[str, str] = field(default_factory=dict)

    @property
    def attempt(self) -> int:
        return self.rec.attempt

    @property
    def url(self) -> str:
        return self.rec.url or ""

    @property
    def variant(self) -> str:
        return self.rec.variant

    def q(self, name: str, default: float) -> float:
        return float(self.query.get(name, default))

    def failing(self, default_fails: int = 1) -> bool:
        """True while this attempt is one of the first ``fail`` (query) attempts."""
        return self.attempt <= int(self.query.get("fail", default_fails))

    def base_headers(self) -> dict[str, str]:
        return {"x-request-id": f"req-{self.rec.scenario}-{self.attempt}"}

    # -- writers -------------------------------------------------------------
    async def start_stream(self, status: int = 200, headers: dict | None = None,
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
        """Write each piece separately; a float item sleeps that many seconds."""
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
        self.rec.outcome = outcome
        self.rec.t_end = time.monotonic()
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
        self.rec.outcome = "reset" if rst else "cut"
        self.rec.t_end = time.monotonic()
        return resp

    async def stall(self, seconds: float = 30.0) -> bool:
        """Send nothing for ``seconds`` (outcome ``stalled`` meanwhile). True, with
        outcome ``client_gone``, when the client hung up first; False when the time
        ran out or the server stops."""
        self.rec.outcome = "stalled"
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and not self.gw._stopping:
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
                           headers: dict | None = None) -> web.StreamResponse:
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
            if await self.stall(float(self.query.get("stall", 30))):
                return resp
            return await self.cut(resp)
        raise ValueError(end)

    async def json_response(self, status: int, obj: Any, *, headers: dict | None = None,
                            content_type: str = "application/json") -> web.StreamResponse:
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        h = {"Content-Type": content_type, **self.base_headers(), **(headers or {})}
        resp = web.Response(status=status, body=raw, headers=h)
        self.rec.status = status
        await resp.prepare(self.request)
        await resp.write_eof()
        self.rec.outcome = "ok" if status == 200 else "error"
        self.rec.t_end = time.monotonic()
        return resp

    async def ok(self, caption: str | None = None, *, usage: dict | None = USAGE_OK,
                 pace: float = 0.0) -> web.StreamResponse:
        """A normal successful stream whose caption is split into word chunks."""
        text = caption if caption is not None else default_caption(self.url)
        words = text.split(" ")
        texts = [w if i == 0 else " " + w for i, w in enumerate(words)]
        if pace:
            pieces: list[bytes | float] = []
            for e in standard_events(texts, usage=usage):
                pieces += [sse(e), pace]
            pieces.append(done())
            return await self.sse_response(pieces)
        return await self.sse_response(stream_body(texts, usage=usage))


Handler = Callable[[Ctx], Awaitable[web.StreamResponse]]
SCENARIOS: dict[str, Handler] = {}


def scenario(name: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        SCENARIOS[name] = fn
        return fn
    return deco


# --------------------------------------------------------------------------- server


class Gateway:
    """The fake server. Use as a context manager or call ``start``/``stop``."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.handlers: dict[str, Handler] = dict(SCENARIOS)
        self._attempts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self.port = 0

    # -- lifecycle -------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "Gateway":
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-gateway", daemon=True)
        self._thread.start()
        ready.wait()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     logger=SERVER_LOG,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._loop is None:
            return
        self._stopping = True
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread:
                self._thread.join(10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- scripting -------------------------------------------------------------
    def on(self, name: str, handler: Handler) -> None:
        """Replace (or add) the handler of scenario ``name`` at run time."""
        self.handlers[name] = handler

    def reset_counts(self) -> None:
        with self._lock:
            self._attempts.clear()

    # -- queries ---------------------------------------------------------------
    def calls(self, url: str | None = None) -> list[Recorded]:
        with self._lock:
            reqs = list(self.requests)
        return [r for r in reqs if url is None or r.url == url]

    def count(self, url: str | None = None) -> int:
        return len(self.calls(url))

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- the handler -------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        url = _image_url(body)
        name, variant, query = _scenario_of(url)
        with self._lock:
            if url is not None:
                self._attempts[url] += 1
            attempt = self._attempts[url] if url is not None else 1
            rec = Recorded(t=time.monotonic(), method=request.method, path=request.path,
                           headers=dict(request.headers), raw=raw, body=body, url=url,
                           scenario=name, variant=variant, attempt=attempt)
            self.requests.append(rec)
        ctx = Ctx(self, request, rec, query)
        if request.method != "POST" or request.path not in ("/v1/chat/completions",
                                                            "/v1/messages"):
            return await ctx.json_response(404, {"error": {
                "message": f"no route {request.method} {request.path}",
                "type": "invalid_request_error", "code": "unknown_url"}})
        if body is None or url is None:
            return await ctx.json_response(400, {"error": {
                "message": "fake gateway: request has no user image_url",
                "type": "invalid_request_error", "code": None}})
        handler = self.handlers.get(name) or self.handlers["unknown"]
        try:
            return await handler(ctx)
        except asyncio.CancelledError:
            rec.outcome = "client_gone"
            rec.t_end = time.monotonic()
            raise


def _image_url(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    for m in body.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), list):
            for part in m["content"]:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    iu = part.get("image_url")
                    if isinstance(iu, dict):
                        return iu.get("url")
                    if isinstance(iu, str):
                        return iu
                # Anthropic Messages (POST /v1/messages): an image block with a url source;
                # scenarios that answer those write Anthropic events themselves.
                if isinstance(part, dict) and part.get("type") == "image":
                    src = part.get("source")
                    if isinstance(src, dict) and src.get("type") == "url":
                        return src.get("url")
    return None


def _scenario_of(url: str | None) -> tuple[str, str, dict[str, str]]:
    if not url:
        return "none", "", {}
    if url.startswith("data:"):
        return "local", "", {}
    parts = urlsplit(url)
    seg = parts.path.lstrip("/").split("/", 1)[0]
    name, _, variant = seg.partition("-")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return name or "unknown", variant, query


def decode_data_uri(url: str) -> tuple[str, bytes]:
    """(mime, bytes) of a ``data:<mime>;base64,<payload>`` URI."""
    head, _, payload = url.partition(",")
    mime = head[len("data:"):].split(";", 1)[0]
    return mime, base64.b64decode(payload)


# --------------------------------------------------------------------------- scenarios
# Success paths and the retry caption.


@scenario("unknown")
async def _unknown(ctx: Ctx) -> web.StreamResponse:
    return await ctx.json_response(400, {"error": {
        "message": f"fake gateway: unknown scenario {ctx.rec.scenario!r}",
        "type": "invalid_request_error", "code": None}})


@scenario("ok")
async def _ok(ctx: Ctx) -> web.StreamResponse:
    return await ctx.ok(pace=ctx.q("pace", 0.0))


@scenario("slow")
async def _slow(ctx: Ctx) -> web.StreamResponse:
    """Caption in ``n`` pieces, ``pace`` seconds apart (after an initial ``delay``)."""
    n, pace, delay = int(ctx.q("n", 10)), ctx.q("pace", 0.02), ctx.q("delay", 0.0)
    text = default_caption(ctx.url)
    size = max(1, -(-len(text) // n))
    texts = [text[i:i + size] for i in range(0, len(text), size)]
    pieces: list[bytes | float] = [delay] if delay else []
    for e in standard_events(texts, usage=USAGE_OK):
        pieces += [sse(e), pace]
    pieces.append(done())
    return await ctx.sse_response(pieces)


@scenario("local")
async def _local(ctx: Ctx) -> web.StreamResponse:
    return await ctx.ok(LOCAL_CAPTION)


async def retry_ok(ctx: Ctx) -> web.StreamResponse:
    return await ctx.ok(RETRY_CAPTION)


# C01..C15: framing, keep-alives, usage placement.

C01_TEXTS = ["A quiet", " harbour", " at dusk."]


@scenario("C01")
async def _c01(ctx: Ctx) -> web.StreamResponse:
    return await ctx.sse_response(stream_body(C01_TEXTS), chunk_size=7)


C02_TEXTS = ["A café", ", 世界", " and 🚀."]


@scenario("C02")
async def _c02(ctx: Ctx) -> web.StreamResponse:
    body = stream_body(C02_TEXTS, ascii=False)
    return await ctx.sse_response(body, chunk_size=1, pause=0.001)


@scenario("C03")
async def _c03(ctx: Ctx) -> web.StreamResponse:
    body = stream_body(C01_TEXTS, nl="\r\n")
    # every CR ends one write and its LF starts the next one
    return await ctx.sse_response(split_after(body, b"\r"), pause=0.003)


@scenario("C04")
async def _c04(ctx: Ctx) -> web.StreamResponse:
    enders = [b"\r\r", b"\n\r\n", b"\r\n\n"]
    events = [json.dumps(e, separators=(",", ":")).encode() for e in standard_events(C01_TEXTS)]
    events.append(b"[DONE]")
    body = b"".join(b"data: " + e + enders[i % 3] for i, e in enumerate(events))
    return await ctx.sse_response(split_after(body, b"\r"), pause=0.003)


@scenario("C05")
async def _c05(ctx: Ctx) -> web.StreamResponse:
    return await ctx.sse_response(stream_body(C01_TEXTS, space=False))


@scenario("C06")
async def _c06(ctx: Ctx) -> web.StreamResponse:
    """Keep-alive comments only, spaced below the idle limit but longer in total."""
    gap, count = ctx.q("gap", 0.6), int(ctx.q("count", 4))
    pieces: list[bytes | float] = []
    for _ in range(count):
        pieces += [b": OPENROUTER PROCESSING\n\n", gap]
    extra = {"obfuscation": "Zq9", "service_tier": "default", "provider": "fake",
             "stream_options": {"include_usage": True}}
    evs = standard_events(C01_TEXTS)
    for i, e in enumerate(evs):
        e.update(extra)
        if i == 1:
            pieces.append(b"event: message\nid: 7\nretry: 3000\n" + sse(e))
        else:
            pieces.append(sse(e))
        pieces.append(b": PING\n\n")
    pieces.append(done())
    return await ctx.sse_response(pieces)


@scenario("C07")
async def _c07(ctx: Ctx) -> web.StreamResponse:
    azure = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
             "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}
    return await ctx.sse_response(sse(azure) + stream_body(C01_TEXTS))


@scenario("C08")
async def _c08(ctx: Ctx) -> web.StreamResponse:
    body = (sse(chunk("", role=True, cid="c8"))
            + b'data: {"id":"c8","object":"chat.completion.chunk",\n'
            + b'data: "choices":[{"index":0,"delta":{"content":"Two gulls."},'
            + b'"finish_reason":null}]}\n\n'
            + sse(chunk(None, finish="stop", cid="c8"))
            + sse(usage_chunk(USAGE_C01, cid="c8")) + done())
    return await ctx.sse_response(body)


USAGE_C09 = {"prompt_tokens": 1090, "completion_tokens": 12, "total_tokens": 1102}


@scenario("C09")
async def _c09(ctx: Ctx) -> web.StreamResponse:
    body = (sse(chunk("", role=True)) + sse(chunk("Gulls wheel"))
            + sse(chunk(" overhead.", finish="stop", usage=USAGE_C09)) + done())
    return await ctx.sse_response(body)


@scenario("C10")
async def _c10(ctx: Ctx) -> web.StreamResponse:
    def u(n: int) -> dict:
        return {"prompt_tokens": 900, "completion_tokens": n, "total_tokens": 900 + n}
    body = (sse(chunk("One", role=True, usage=u(1))) + sse(chunk(" two", usage=u(2)))
            + sse(chunk(" three", usage=u(3))) + sse(chunk(None, finish="stop", usage=u(4)))
            + done())
    return await ctx.sse_response(body)


@scenario("C11")
async def _c11(ctx: Ctx) -> web.StreamResponse:
    evs = standard_events(C01_TEXTS)
    pieces: list[bytes | float] = [sse(e) for e in evs[:-1]]
    pieces += [ctx.q("silence", 1.5), sse(evs[-1]), done()]
    return await ctx.sse_response(pieces)


@scenario("C12")
async def _c12(ctx: Ctx) -> web.StreamResponse:
    evs = standard_events(C01_TEXTS, usage=None)
    tail = chunk(None, finish="stop", usage=USAGE_C01)
    tail["choices"][0]["delta"] = {}
    return await ctx.sse_response(b"".join(sse(e) for e in evs) + sse(tail) + done())


@scenario("C13")
async def _c13(ctx: Ctx) -> web.StreamResponse:
    return await ctx.sse_response(stream_body(C01_TEXTS, usage=None))


@scenario("C14")
async def _c14(ctx: Ctx) -> web.StreamResponse:
    def one(content: str | None, finish: str) -> bytes:
        return sse(chunk(content if content is not None else "", role=True, finish=finish,
                         with_usage_key=False))
    body = (one("", "") + one("", "") + one("A quiet", "") + one(" harbour", "")
            + one(" at dusk.", "") + one("", "stop") + one("", "") + done())
    return await ctx.sse_response(body)


@scenario("C15")
async def _c15(ctx: Ctx) -> web.StreamResponse:
    body = (sse(chunk("", role=True))
            + sse(chunk(None, delta={"reasoning_content": "REASONING: harbour lights."}))
            + sse(chunk(None, delta={"reasoning_content": " REASONING: dusk."}))
            + sse(chunk("A quiet harbour", index=1)) + sse(chunk(" at dusk.", index=1))
            + sse(chunk(None, finish="stop")) + sse(usage_chunk(USAGE_C01)) + done())
    return await ctx.sse_response(body)


# C17: non-standard finish reasons (variant = raw finish reason).


@scenario("C17")
async def _c17(ctx: Ctx) -> web.StreamResponse:
    return await ctx.sse_response(stream_body(C01_TEXTS, finish=ctx.variant))


# C18..C25: errors and incomplete streams inside a 200.


@scenario("C18")
async def _c18(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing():
        return await retry_ok(ctx)
    err = {"error": {"message": "CUDA out of memory", "type": "InternalServerError",
                     "param": None, "code": 500}}
    body = b"".join(sse(e) for e in standard_events(PARTIAL)[:3]) + sse(err) + done()
    return await ctx.sse_response(body)


@scenario("C19")
async def _c19(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing():
        return await retry_ok(ctx)
    err = {"id": "gen-1", "object": "chat.completion.chunk", "created": 1767225602, "model": "x",
           "provider": "p", "error": {"code": "server_error",
                                      "message": "Provider disconnected unexpectedly"},
           "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}
    body = b"".join(sse(e) for e in standard_events(PARTIAL)[:3]) + sse(err)
    return await ctx.sse_response(body)


@scenario("C20")
async def _c20(ctx: Ctx) -> web.StreamResponse:
    """Truncated: role + two content chunks, then FIN (variant ``eof``: a clean
    chunked end instead)."""
    if not ctx.failing():
        return await retry_ok(ctx)
    body = b"".join(sse(e) for e in standard_events(PARTIAL)[:3])
    return await ctx.sse_response(body, end="eof" if ctx.variant == "eof" else "cut")


@scenario("C21")
async def _c21(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing(99):
        return await retry_ok(ctx)
    body = b"".join(sse(e) for e in standard_events(PARTIAL)[:3]) + done()
    return await ctx.sse_response(body)


@scenario("C22")
async def _c22(ctx: Ctx) -> web.StreamResponse:
    return await ctx.sse_response(stream_body(C01_TEXTS, with_done=False))


@scenario("C23")
async def _c23(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing(99):
        return await retry_ok(ctx)
    u = {"prompt_tokens": 1200, "completion_tokens": 1, "total_tokens": 1201}
    body = (sse(chunk("", role=True)) + sse(chunk(None, finish="stop"))
            + sse(usage_chunk(u)) + done())
    return await ctx.sse_response(body)


C24_MESSAGE = "upstream error (request id: 2026112422)"


@scenario("C24")
async def _c24(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing():
        return await retry_ok(ctx)
    bare = json.dumps({"error": {"message": C24_MESSAGE, "type": "new_api_error", "param": "",
                                 "code": "stream_response_error"}}).encode()
    body = sse(chunk("", role=True)) + sse(chunk(PARTIAL[0])) + bare + b"\n"
    return await ctx.sse_response(body)


@scenario("C25")
async def _c25(ctx: Ctx) -> web.StreamResponse:
    if ctx.attempt > 1:
        return await ctx.ok("Clean retry caption.")
    body = (sse(chunk("", role=True, cid="msg_A")) + sse(chunk(PARTIAL[0], cid="msg_A"))
            + b"".join(sse(e) for e in standard_events(["A complete", " caption."],
                                                       cid="msg_B")) + done())
    return await ctx.sse_response(body)


# C26, C27: JSON instead of SSE.


@scenario("C26")
async def _c26(ctx: Ctx) -> web.StreamResponse:
    return await ctx.json_response(200, {"error": {
        "message": "model not found", "type": "invalid_request_error",
        "code": "model_not_found"}})


C27_USAGE = {"prompt_tokens": 1500, "completion_tokens": 9, "total_tokens": 1509}


@scenario("C27")
async def _c27(ctx: Ctx) -> web.StreamResponse:
    return await ctx.json_response(200, {
        "id": "chatcmpl-c27", "object": "chat.completion", "created": 1767225600,
        "model": MODEL, "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "A tabby cat on a sill."},
            "finish_reason": "stop"}], "usage": C27_USAGE})


@scenario("json200")
async def _json200(ctx: Ctx) -> web.StreamResponse:
    """200 + application/json error body (retryable per the client contract)."""
    if not ctx.failing():
        return await retry_ok(ctx)
    return await ctx.json_response(200, {"error": {
        "message": "upstream overloaded, try again", "type": "server_error", "code": None}})


# C28..C35, C40: HTTP errors.

RATE_LIMIT_BODY = {"error": {"message": "Rate limit reached for gpt-4o-mini in organization "
                             "org-fake on requests per min (RPM): Limit 3, Used 3, Requested 1. "
                             "Please try again in 1.5s.", "type": "requests",
                             "param": None, "code": "rate_limit_exceeded"}}


@scenario("C28")
async def _c28(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing():
        return await retry_ok(ctx)
    ra = ctx.query.get("ra", "2")
    return await ctx.json_response(429, RATE_LIMIT_BODY, headers={
        "Retry-After": ra, "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1.5s"})


@scenario("C29")
async def _c29(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing():
        return await retry_ok(ctx)
    return await ctx.json_response(429, RATE_LIMIT_BODY,
                                   headers={"Retry-After": http_date(3)})


@scenario("C30")
async def _c30(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing():
        return await retry_ok(ctx)
    if ctx.variant == "go":   # a Go duration with two groups: 0m1.5s = 1.5 s
        h = {"x-ratelimit-remaining-tokens": "0",
             "x-ratelimit-reset-tokens": ctx.query.get("reset", "0m1.5s")}
    else:                     # an RFC 3339 time 2 s ahead (1 s resolution: 1..2 s)
        at = datetime.now(timezone.utc) + timedelta(seconds=2)
        h = {"anthropic-ratelimit-tokens-remaining": "0",
             "anthropic-ratelimit-tokens-reset": at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    # no "try again in ..." hint in the text: only the reset header says how long
    body = {"error": {"message": "Rate limit reached for tokens per min (TPM).",
                      "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
    return await ctx.json_response(429, body, headers=h)


@scenario("C31")
async def _c31(ctx: Ctx) -> web.StreamResponse:
    if ctx.variant == "spend":
        body = {"type": "error", "error": {
            "type": "rate_limit_error", "message": "Spend limit reached for this workspace.",
            "details": {"error_code": "enforced_spend_limit_reached"}}}
    else:
        body = {"error": {"message": "You exceeded your current quota, please check your "
                          "plan and billing details.", "type": "insufficient_quota",
                          "param": None, "code": "insufficient_quota"}}
    return await ctx.json_response(429, body)


C32_MESSAGE = ("Request too large for gpt-4o in organization org-fake on tokens per min "
               "(TPM): Limit 30000, Requested 34307.")


@scenario("C32")
async def _c32(ctx: Ctx) -> web.StreamResponse:
    return await ctx.json_response(429, {"error": {"message": C32_MESSAGE, "type": "tokens",
                                                   "param": None, "code": "rate_limit_exceeded"}})


HTML_503 = ("<html><head><title>503 Service Temporarily Unavailable</title></head><body>"
            "<center><h1>503 Service Temporarily Unavailable</h1></center><hr>"
            "<center>nginx</center>" + "<!-- padding -->" * 300 + "</body></html>").encode()
HTML_502 = (b"<html><head><title>502 Bad Gateway</title></head><body><center>"
            b"<h1>502 Bad Gateway</h1></center><hr><center>cloudflare</center></body></html>")


@scenario("C33")
async def _c33(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing():
        return await retry_ok(ctx)
    if ctx.variant == "529":
        return await ctx.json_response(529, {"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}})
    if ctx.variant == "503":
        return await ctx.json_response(503, HTML_503, content_type="text/html",
                                       headers={"Retry-After": "1"})
    return await ctx.json_response(502, HTML_502, content_type="text/html")


C34_CASES = {
    "5mb": (400, {"x-should-retry": "false"}, {"type": "error", "error": {
        "type": "invalid_request_error", "message": "messages.0.content.0.image.source.base64: "
        "image exceeds 5 MB maximum: 5527911 bytes > 5242880 bytes"}, "request_id": "req_x"}),
    "process": (400, {}, {"type": "error", "error": {
        "type": "invalid_request_error", "message": "Could not process image"}}),
    "mediatype": (400, {}, {"type": "error", "error": {
        "type": "invalid_request_error", "message": "messages.0.content.0.image.source.base64: "
        "Image does not match the provided media type image/png"}}),
    "convert": (500, {}, {"error": {"message": "convert request failed: fetch image failed",
                                    "type": "new_api_error", "param": "",
                                    "code": "convert_request_failed"}}),
    "422": (422, {}, {"error": {"message": "Unprocessable entity: bad image payload",
                                "type": "invalid_request_error", "code": None}}),
    "413": (413, {}, {"error": {"message": "Request entity too large",
                                "type": "invalid_request_error", "code": "request_too_large"}}),
    "noretry": (503, {"x-should-retry": "false"}, {"error": {
        "message": "Service refuses this input", "type": "server_error", "code": None}}),
}


@scenario("C34")
async def _c34(ctx: Ctx) -> web.StreamResponse:
    status, headers, body = C34_CASES[ctx.variant]
    return await ctx.json_response(status, body, headers=headers)


C35_CASES = {
    "401": (401, {"error": {"message": "Incorrect API key provided: sk-test-***-123.",
                            "type": "invalid_request_error", "code": "invalid_api_key"}}),
    "403": (403, {"type": "error", "error": {"type": "permission_error",
                                             "message": "Your key lacks permission."}}),
    "404": (404, {"type": "error", "error": {"type": "not_found_error",
                                             "message": "model: no-such-model"}}),
}


@scenario("C35")
async def _c35(ctx: Ctx) -> web.StreamResponse:
    status, body = C35_CASES[ctx.variant or "401"]
    return await ctx.json_response(status, body)


@scenario("C39")
async def _c39(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing():
        return await retry_ok(ctx)
    body = b"".join(sse(e) for e in standard_events(PARTIAL)[:2])
    return await ctx.sse_response(body, end="stall")


C40_MESSAGE = 'Invalid JSON payload received. Unknown name "foo"'


@scenario("C40")
async def _c40(ctx: Ctx) -> web.StreamResponse:
    return await ctx.json_response(400, [{"error": {"code": 400, "message": C40_MESSAGE,
                                                    "status": "INVALID_ARGUMENT"}}])


# Extra faults used by test_faults.py.


@scenario("reset")
async def _reset(ctx: Ctx) -> web.StreamResponse:
    """Partial text, then a TCP reset (RST)."""
    if not ctx.failing():
        return await retry_ok(ctx)
    body = b"".join(sse(e) for e in standard_events(PARTIAL)[:3])
    return await ctx.sse_response(body, end="reset")


@scenario("badjson")
async def _badjson(ctx: Ctx) -> web.StreamResponse:
    """A data event that is not valid JSON in the middle of a complete-looking stream."""
    if not ctx.failing():
        return await retry_ok(ctx)
    evs = standard_events(PARTIAL)
    body = (sse(evs[0]) + sse(evs[1]) + b'data: {"choices":[{"index":0,"delta":{"content":"br\n\n'
            + b"".join(sse(e) for e in evs[2:]) + done())
    return await ctx.sse_response(body)


@scenario("s529")
async def _s529(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing(99):
        return await retry_ok(ctx)
    return await ctx.json_response(529, {"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}})


@scenario("html503")
async def _html503(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing(99):
        return await retry_ok(ctx)
    return await ctx.json_response(503, HTML_503, content_type="text/html")


@scenario("s500")
async def _s500(ctx: Ctx) -> web.StreamResponse:
    if not ctx.failing(99):
        return await retry_ok(ctx)
    return await ctx.json_response(500, {"error": {
        "message": "The server had an error while processing your request.",
        "type": "server_error", "param": None, "code": None}})


@scenario("bad400")
async def _bad400(ctx: Ctx) -> web.StreamResponse:
    return await ctx.json_response(400, {"error": {
        "message": "Invalid image.", "type": "invalid_request_error", "param": None,
        "code": None}})


@scenario("deny")
async def _deny(ctx: Ctx) -> web.StreamResponse:
    return await ctx.json_response(*C35_CASES["401"])


# A gateway that quotes the credentials it received back in its error bodies.


def _quoted_key(ctx: Ctx) -> tuple[str, str]:
    auth = ctx.request.headers.get("Authorization", "")
    return auth, auth.partition(" ")[2]


@scenario("echokey")
async def _echokey(ctx: Ctx) -> web.StreamResponse:
    """400 quoting the key and the whole header; variant ``401`` (fatal), ``stream``
    (an error inside a 200 stream, retried)."""
    auth, key = _quoted_key(ctx)
    if ctx.variant == "401":
        return await ctx.json_response(401, {"error": {
            "message": f"Incorrect API key provided: {key}. Header was Authorization: {auth}",
            "type": "invalid_request_error", "code": "invalid_api_key"}})
    if ctx.variant == "stream":
        body = sse(chunk("", role=True)) + sse({"error": {
            "message": f"upstream refused key {key}", "type": "server_error"}})
        return await ctx.sse_response(body)
    return await ctx.json_response(400, {"error": {
        "message": f"Invalid image for key {key} (headers: {{'Authorization': '{auth}'}})",
        "type": "invalid_request_error", "param": None, "code": None}})
