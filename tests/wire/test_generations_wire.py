"""One generation per caption, over real bytes from a loopback gateway.

A gateway that restarts the generation inside one response, and the minor wire cases
around it: the stored caption equals exactly one generation's text, and ``quirks``
records what happened.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from fake_gateway import Ctx, done, img, sse


def chunk(content: Any = None, finish: Any = None, cid: str = "chatcmpl-g",
          model: str = "m", role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    return {"id": cid, "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"prompt_tokens": 40, "completion_tokens": 6, "total_tokens": 46}
WHOLE = "A red kayak rests on a pebble beach."
CASES: dict[str, tuple[bytes, str, str | None]] = {  # body, caption, quirk
    "restart-same-id": (b"".join(sse(c) for c in [
        chunk("", role=True), chunk("A red kay"), chunk("", role=True),
        chunk("A red kayak rests"), chunk(" on a pebble beach."), chunk(finish="stop")])
        + done(), WHOLE, "generation_restarted"),
    "usage-other-id": (b"".join(sse(c) for c in [
        chunk("", role=True), chunk(WHOLE), chunk(finish="stop"),
        {"id": "chatcmpl-usage", "choices": [], "usage": USAGE}]) + done(), WHOLE, None),
    "list-content": (b"".join(sse(c) for c in [
        chunk("", role=True), chunk([{"type": "text", "text": "A red kayak rests"}]),
        chunk([{"type": "text", "text": " on a pebble beach."}]), chunk(finish="stop")])
        + done(), WHOLE, None),
    "model-switch": (b"".join(sse(c) for c in [
        chunk("", role=True, model="m-a"), chunk("A red kayak rests", model="m-a"),
        chunk(" on a pebble beach.", model="m-b"), chunk(finish="stop", model="m-b")])
        + done(), WHOLE, "model_changed"),
    "invalid-utf8": (sse(chunk("", role=True))
                     + b'data: {"id":"chatcmpl-g","choices":[{"index":0,"delta":{"content":'
                       b'"A red \xff kayak."},"finish_reason":"stop"}]}\n\n' + done(),
                     "A red \ufffd kayak.", "invalid_utf8"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_caption_is_one_generation_and_quirks_say_what_happened(caption: Any,
                                                                     gateway: Any,
                                                                     name: str) -> None:
    body, expected, quirk = CASES[name]

    async def handler(ctx: Ctx) -> web.StreamResponse:
        return await ctx.sse_response(body, chunk_size=5)

    gateway.on("GEN", handler)
    res = caption([{"id": "g", "image": img("GEN", f"{name}.jpg")}])
    assert res.code == 0, res.stderr
    row = res.row("g")
    assert row["caption"] == expected and gateway.count() == 1
    quirks = json.loads(row["quirks"] or "{}")
    if quirk is not None:
        assert quirks.get(quirk, 0) >= 1, quirks
    if name == "usage-other-id":
        assert row["total_tokens"] == 46
