"""A value of the wrong type from the wire never stops the batch or poisons the writer.

Each case runs a real loopback gateway that sends the poison in real bytes, split at
awkward places, for one row among healthy ones: the run goes on, the poisoned row is
either ok with a clean value or an error row with a reason, every other row is ok,
and a rerun sends nothing (the error is permanent, or the row was ok).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from fake_gateway import Ctx, RawServer, done, img, sse

HEALTHY = [{"id": f"ok{i}", "image": img("ok", f"{i}.jpg")} for i in range(3)]


def _chunk(cid: Any = "chatcmpl-p", model: Any = "m", content: Any = None,
           finish: Any = None, role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    return {"id": cid, "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _stream(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(sse(c) for c in chunks) + done()


POISONS: dict[str, bytes] = {
    "model-number": _stream([_chunk(model=123, role=True, content=""),
                             _chunk(model=123, content="A numbered model."),
                             _chunk(model=123, finish="stop")]),
    "id-number": _stream([_chunk(cid=42, role=True, content=""),
                          _chunk(cid=42, content="A numbered id."), _chunk(cid=42, finish="stop")]),
    "finish-number": _stream([_chunk(role=True, content=""), _chunk(content="Text."),
                              _chunk(finish=7)]),
    "finish-bool": _stream([_chunk(role=True, content=""), _chunk(content="Text."),
                            _chunk(finish=True)]),
    # ensure_ascii JSON writes the emoji as two \\u escapes; they are split across writes.
    "emoji-escapes": _stream([_chunk(role=True, content=""), _chunk(content="Rocket \ud83d"),
                              _chunk(content="\ude80 launch."), _chunk(finish="stop")]),
}
EXPECTED: dict[str, tuple[str, str | None]] = {  # status, and error_class or a column check
    "model-number": ("ok", None), "id-number": ("ok", None),
    "finish-number": ("error", "bad_response"), "finish-bool": ("error", "bad_response"),
    "emoji-escapes": ("ok", None),
}


def _poison_handler(body: bytes):  # type: ignore[no-untyped-def]
    async def handler(ctx: Ctx) -> web.StreamResponse:
        return await ctx.sse_response(body, chunk_size=7)  # awkward splits everywhere
    return handler


def _run_poison(caption: Any, gateway: Any, name: str) -> Any:
    gateway.on("POISON", _poison_handler(POISONS[name]))
    rows = [{"id": "poison", "image": img("POISON", f"{name}.jpg")}, *HEALTHY]
    return caption(rows, concurrency=4)


@pytest.mark.parametrize("name", sorted(POISONS))
def test_a_poisoned_value_costs_at_most_its_own_row(caption: Any, gateway: Any,
                                                     name: str) -> None:
    first = _run_poison(caption, gateway, name)
    status, cls = EXPECTED[name]
    assert first.code == (0 if status == "ok" else 1), first.stderr
    assert "Traceback" not in first.stderr
    row = first.row("poison")
    assert row["status"] == status and row["error_class"] == cls
    assert all(first.row(r["id"])["status"] == "ok" for r in HEALTHY)
    sent = gateway.count()
    again = caption([{"id": "poison", "image": img("POISON", f"{name}.jpg")}, *HEALTHY])
    assert again.code == 0 and gateway.count() == sent, "a rerun sends nothing"


@pytest.mark.parametrize("name,column,value", [("model-number", "model", "123"),
                                               ("id-number", "response_id", "42")])
def test_a_number_where_text_belongs_is_stored_as_its_text(caption: Any, gateway: Any,
                                                           name: str, column: str,
                                                           value: str) -> None:
    assert _run_poison(caption, gateway, name).row("poison")[column] == value


def test_an_emoji_split_as_two_escapes_is_one_character(caption: Any, gateway: Any) -> None:
    row = _run_poison(caption, gateway, "emoji-escapes").row("poison")
    assert row["caption"] == "Rocket \U0001f680 launch."


def test_a_lone_surrogate_in_an_error_message_is_replaced(caption: Any,
                                                          gateway: Any) -> None:
    body = b'{"error":{"message":"bad image \\udc80 here","type":"invalid_request_error"}}'

    async def handler(ctx: Ctx) -> web.StreamResponse:
        return await ctx.json_response(400, body)

    gateway.on("POISON", handler)
    res = caption([{"id": "poison", "image": img("POISON", "e.jpg")}, *HEALTHY])
    assert res.code == 1
    row = res.row("poison")
    assert row["error_class"] in ("bad_request", "bad_image") and "\ufffd" in row["error"]
    assert all(res.row(r["id"])["status"] == "ok" for r in HEALTHY)


def test_an_anthropic_stop_reason_that_is_a_number_fails_only_its_row(caption: Any,
                                                                      gateway: Any) -> None:
    def events(text: str, stop: Any) -> bytes:
        def ev(name: str, **f: Any) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **f})}\n\n".encode()
        return (ev("message_start", message={"id": "msg_1", "model": "claude-x",
                                             "usage": {"input_tokens": 9}})
                + ev("content_block_start", index=0, content_block={"type": "text", "text": ""})
                + ev("content_block_delta", index=0, delta={"type": "text_delta", "text": text})
                + ev("message_delta", delta={"stop_reason": stop}, usage={"output_tokens": 3})
                + ev("message_stop"))

    async def ok(ctx: Ctx) -> web.StreamResponse:
        return await ctx.sse_response(events("A fine caption.", "end_turn"), chunk_size=5)

    async def poison(ctx: Ctx) -> web.StreamResponse:
        return await ctx.sse_response(events("Text.", 1), chunk_size=5)

    gateway.on("ANT", ok)
    gateway.on("POISON", poison)
    rows = [{"id": "poison", "image": img("POISON", "a.jpg")},
            *({"id": f"a{i}", "image": img("ANT", f"{i}.jpg")} for i in range(3))]
    res = caption(rows, "--api", "anthropic")
    assert res.code == 1, res.stderr
    assert res.row("poison")["error_class"] == "bad_response"
    assert all(res.row(f"a{i}")["status"] == "ok" for i in range(3))


# ---------------------------------------------------------------- a raw byte in a header


@pytest.fixture
def raw_header_server() -> Iterator[RawServer]:
    body = _stream([_chunk(role=True, content=""), _chunk(content="A caption."),
                    _chunk(finish="stop")])
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"x-request-id: req-\xff\xfe-1\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    with RawServer(response) as server:  # aiohttp cannot put a 0xff byte into a header
        yield server


def test_an_undecodable_byte_in_a_header_is_replaced(caption: Any,
                                                     raw_header_server: RawServer) -> None:
    url = f"http://127.0.0.1:{raw_header_server.port}/v1"
    res = caption([{"id": f"r{i}", "image": img("ok", f"{i}.jpg")} for i in range(4)],
                  base_url=url)
    assert res.code == 0, res.stderr
    rid = res.row("r0")["request_id"]
    assert rid.startswith("req-") and "\ufffd" in rid
    rid.encode("utf-8")
    again = caption([{"id": f"r{i}", "image": img("ok", f"{i}.jpg")} for i in range(4)],
                    base_url=url)
    assert again.code == 0 and raw_header_server.count() == 4
