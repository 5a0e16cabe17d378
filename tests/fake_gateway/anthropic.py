"""An Anthropic-style ``POST /v1/messages`` and the bytes of its Messages streams.

``AnthropicGateway.script(request) -> pieces`` gives the SSE body of each request,
written piece by piece with a short pause so the client sees each piece as its own
read (awkward boundaries survive). Requests are recorded with the image they carry
(``key``: the url, or a hash of the base64 data) and the attempt for that image.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .server import Exchange, LoopbackServer, Seen

__all__ = ["A_MODEL", "A_VERSION", "ARequest", "AnthropicGateway", "PING", "a_delta",
           "a_event", "a_start", "a_stream"]

A_MODEL = "claude-test-model"
A_VERSION = "2023-06-01"
PING = b'event: ping\ndata: {"type": "ping"}\n\n'


@dataclass
class ARequest(Seen):
    body: Any = None
    key: str = "?"    # the image (url, or sha256 of base64 data)
    attempt: int = 1

    @property
    def content(self) -> list[dict[str, Any]]:
        (msg,) = self.body["messages"]
        assert msg["role"] == "user"
        return msg["content"]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


Script = Callable[[ARequest], list[bytes]]


class AnthropicGateway(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.script: Script = lambda req: a_stream(["Default caption."])
        self.pause = 0.001
        self._attempts: dict[str, int] = defaultdict(int)
        self._count_lock = threading.Lock()

    @property
    def messages(self) -> list[ARequest]:
        return [r for r in self.requests() if isinstance(r, ARequest)]

    def record(self, request: web.Request, raw: bytes) -> ARequest:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        key = _image_key(body)
        with self._count_lock:
            self._attempts[key] += 1
            attempt = self._attempts[key]
        return ARequest(**vars(super().record(request, raw)), body=body, key=key,
                        attempt=attempt)

    async def dispatch(self, ex: Exchange) -> web.StreamResponse:
        rec = ex.rec
        assert isinstance(rec, ARequest)
        if rec.method != "POST" or rec.path != "/v1/messages":
            return await ex.json_response(404, {"type": "error", "error": {
                "type": "not_found_error", "message": f"no route {rec.path}"}})
        resp = await ex.start_stream(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "request-id": f"req_{rec.attempt}"})
        try:
            await ex.write_pieces(resp, list(self.script(rec)), pause=self.pause)
            return await ex.end(resp)
        except ConnectionError:  # the client may hang up once it has message_stop
            return resp


def _image_key(body: Any) -> str:
    try:
        for block in body["messages"][0]["content"]:
            if block.get("type") == "image":
                src = block["source"]
                if src.get("type") == "url":
                    return str(src["url"])
                return "b64:" + hashlib.sha256(src.get("data", "").encode()).hexdigest()
    except (KeyError, IndexError, TypeError, AttributeError):
        pass
    return "?"


def a_event(name: str, obj: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def a_start(msg_id: str = "msg_01", input_tokens: int = 1523) -> bytes:
    return a_event("message_start", {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": A_MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 1}}})


def a_delta(text: str) -> bytes:
    return a_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": text}})


def a_stream(texts: list[str], *, msg_id: str = "msg_01", input_tokens: int = 1523,
             output_tokens: int = 17, stop_reason: str = "end_turn") -> list[bytes]:
    """A complete Messages stream, a ping after the block start and after each delta."""
    evs = [a_start(msg_id, input_tokens),
           a_event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
           PING]
    for t in texts:
        evs += [a_delta(t), PING]
    evs += [a_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            a_event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason,
                                                "stop_sequence": None},
                                      "usage": {"output_tokens": output_tokens}}),
            a_event("message_stop", {"type": "message_stop"})]
    return evs
