"""The OpenAI-compatible gateway: ``POST /v1/chat/completions`` answered by scenario.

The handler reads the request JSON and takes the ``image_url.url`` of the user message
(or an Anthropic ``image`` block's url). Tests use pass-through URLs such as
``http://img.test/C18/a.jpg?fail=2``:

* the first path segment is the *scenario* (``C18``); a suffix after the first ``-`` is
  its *variant* (``C17-refusal`` -> scenario ``C17``, variant ``refusal``);
* the query string carries knobs (``fail=N``: how many attempts fail before the
  scenario succeeds; ``pace``, ``n``, ``delay`` for slow streams; ``stall``);
* attempts are counted per URL, so "fail on attempt 1, succeed on attempt 2" stays
  deterministic however many rows run concurrently;
* a local image arrives as a ``data:`` URI and is served by the ``local`` scenario.

``gateway.on(name, handler)`` scripts a scenario for one test. Every request is
recorded (``Recorded``: arrival and end time, headers, body, attempt, status, outcome).
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from .server import Exchange, LoopbackServer, Seen
from .sse import USAGE_OK, default_caption, done, sse, standard_events, stream_body

__all__ = ["Ctx", "Gateway", "Recorded", "SCENARIOS", "scenario"]


@dataclass
class Recorded(Seen):
    """One request to the gateway, with what chose its answer."""

    body: Any = None              # the parsed JSON, or None
    url: str | None = None        # the image_url.url of the user message
    scenario: str = ""
    variant: str = ""
    attempt: int = 1              # 1-based, per url

    @property
    def user_content(self) -> list[Any]:
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


class Ctx(Exchange):
    """What a scenario handler gets: the request, its record and response helpers."""

    server: Gateway
    rec: Recorded

    def __init__(self, server: Gateway, request: web.Request, rec: Recorded) -> None:
        super().__init__(server, request, rec)
        self.gw = server
        self.query = _scenario_of(rec.url)[2]

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

    def stall_seconds(self) -> float:
        return self.q("stall", 30)

    async def ok(self, caption: str | None = None, *, usage: dict[str, Any] | None = USAGE_OK,
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


class Gateway(LoopbackServer):
    """The fake gateway. Use as a context manager or call ``start``/``stop``."""

    exchange = Ctx

    def __init__(self) -> None:
        super().__init__()
        self.handlers: dict[str, Handler] = dict(SCENARIOS)
        self._attempts: dict[str, int] = defaultdict(int)
        self._count_lock = threading.Lock()

    # -- scripting -------------------------------------------------------------
    def on(self, name: str, handler: Handler) -> None:
        """Replace (or add) the handler of scenario ``name`` at run time."""
        self.handlers[name] = handler

    def reset_counts(self) -> None:
        with self._count_lock:
            self._attempts.clear()

    # -- queries ---------------------------------------------------------------
    def calls(self, url: str | None = None) -> list[Recorded]:
        return [r for r in self.requests()
                if isinstance(r, Recorded) and (url is None or r.url == url)]

    def count(self, url: str | None = None) -> int:
        return len(self.calls(url))

    # -- the handler -------------------------------------------------------------
    def record(self, request: web.Request, raw: bytes) -> Recorded:
        base = super().record(request, raw)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        url = _image_url(body)
        name, variant, _ = _scenario_of(url)
        with self._count_lock:
            if url is not None:
                self._attempts[url] += 1
            attempt = self._attempts[url] if url is not None else 1
        return Recorded(**vars(base), body=body, url=url, scenario=name, variant=variant,
                        attempt=attempt)

    async def dispatch(self, ex: Exchange) -> web.StreamResponse:
        assert isinstance(ex, Ctx)
        request, rec = ex.request, ex.rec
        if request.method != "POST" or request.path not in ("/v1/chat/completions",
                                                            "/v1/messages"):
            return await ex.json_response(404, {"error": {
                "message": f"no route {request.method} {request.path}",
                "type": "invalid_request_error", "code": "unknown_url"}})
        if rec.body is None or rec.url is None:
            return await ex.json_response(400, {"error": {
                "message": "fake gateway: request has no user image_url",
                "type": "invalid_request_error", "code": None}})
        handler = self.handlers.get(rec.scenario) or self.handlers["unknown"]
        return await handler(ex)


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
