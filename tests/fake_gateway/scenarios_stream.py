"""Scenarios of success, framing and errors inside a 200 (conformance cases C01..C27).

Each is registered under its id (``img("C18")`` selects it); docs/protocol.md §10 says
what each sends and what the client must make of it.
"""

from __future__ import annotations

import json

from aiohttp import web

from .gateway import Ctx, scenario
from .sse import (
    LOCAL_CAPTION,
    MODEL,
    PARTIAL,
    RETRY_CAPTION,
    USAGE_C01,
    USAGE_OK,
    chunk,
    default_caption,
    done,
    split_after,
    sse,
    standard_events,
    stream_body,
    usage_chunk,
)

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
