"""Scenarios of HTTP errors and rate limits (conformance cases C28..C40) and the extra
faults of tests/wire/test_faults.py and the secrets tests.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp import web

from .gateway import Ctx, scenario
from .scenarios_stream import retry_ok
from .sse import PARTIAL, chunk, done, http_date, sse, standard_events

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
        at = datetime.now(UTC) + timedelta(seconds=2)
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
    (an error inside a 200 stream, retried), ``caption`` (an ok stream whose caption
    quotes the key: a refusal first, so the quality gate re-asks, then a caption)."""
    auth, key = _quoted_key(ctx)
    if ctx.variant == "caption":
        if ctx.attempt == 1:
            return await ctx.ok(f"I'm sorry, but I can't help with that, {key}.")
        return await ctx.ok(f"A photo of a desk; a note on it reads {key} and {auth}.")
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
