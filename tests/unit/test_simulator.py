"""Tests of the local gateway simulator (pipeline.simulator): a real server on 127.0.0.1:0.

The SSE parsing here is a deliberately tiny helper of its own, not the client's
pipeline.sse: the simulator is what the client is tested against, so the two must not
share code.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from pipeline.simulator import cli as simulator_cli
from pipeline.simulator.app import STATS, SimConfig, SimStats, go_duration, start
from pipeline.simulator.captions import claude_image_tokens, split_tokens

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data" / "sample"
PROMPT = "Write one factual caption for this photo."
TEXT_TOKENS = math.ceil(len(PROMPT) / 4) + 4  # ~4 chars a token + 4 per message
GO_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|us|µs|ns|h|m|s))+")
Reply = tuple[int, CIMultiDictProxy[str], str]


# ---------------------------------------------------------------- helpers


def data_uri(name: str) -> str:
    mime = "image/jpeg" if name.endswith(".jpg") else "image/png"
    return f"data:{mime};base64,{base64.b64encode((SAMPLES / name).read_bytes()).decode()}"


def chat_body(
    image: str = "camera.png", *, url: str | None = None, stream: bool = True,
    usage: bool = True, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    image_part = {"type": "image_url", "image_url": {"url": url or data_uri(image)}}
    body: dict[str, Any] = {"model": "sim-model", "stream": stream, **extra}
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": PROMPT}, image_part]}]
    if stream and usage:
        body["stream_options"] = {"include_usage": True}
    return body


def anthropic_body(
    name: str = "camera.png", media_type: str = "image/png", stream: bool = True
) -> dict[str, Any]:
    data = base64.b64encode((SAMPLES / name).read_bytes()).decode()
    source = {"type": "base64", "media_type": media_type, "data": data}
    content = [{"type": "image", "source": source}, {"type": "text", "text": PROMPT}]
    messages = [{"role": "user", "content": content}]
    return {"model": "claude-sim", "max_tokens": 300, "stream": stream, "messages": messages}


def parse_sse(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) per event; events are separated by blank lines."""
    events = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((name, "\n".join(data)))
    return events


def chunks(text: str) -> list[dict[str, Any]]:
    """JSON objects of an OpenAI stream, without the [DONE] terminator."""
    return [json.loads(data) for _, data in parse_sse(text) if data != "[DONE]"]


def caption_of(objs: list[dict[str, Any]], index: int = 0) -> str:
    deltas = (c["delta"] for o in objs for c in o["choices"] if c["index"] == index)
    return "".join(d.get("content") or "" for d in deltas)


def claude_tokens(width: int, height: int) -> int:
    return math.ceil(width * height / 750)


@dataclass(frozen=True)
class Sim:
    """One running simulator and a client session pointed at it."""

    base: str
    app: web.Application
    session: aiohttp.ClientSession

    @property
    def stats(self) -> SimStats:
        return self.app[STATS]

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        if body is not None:  # a stream, not bytes: aiohttp warns about large bytes bodies
            kwargs["data"] = io.BytesIO(json.dumps(body).encode())
            kwargs.setdefault("headers", {})["Content-Type"] = "application/json"
        async with self.session.post(self.base + path, **kwargs) as response:
            return response.status, response.headers, await response.text()

    async def chat(self, body: Any = None, **kwargs: Any) -> Reply:
        return await self.post("/v1/chat/completions", body, **kwargs)

    async def anthropic(self, body: Any) -> Reply:
        return await self.post("/v1/messages", body)

    async def caption(self, image: str) -> str:
        status, _, text = await self.chat(chat_body(image))
        assert status == 200
        return caption_of(chunks(text))


Serve = Callable[..., Awaitable[Sim]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start simulators with SimConfig overrides; fast (no latency, no pacing) by default."""
    runners: list[web.AppRunner] = []
    async with aiohttp.ClientSession() as session:

        async def _serve(**overrides: Any) -> Sim:
            config = SimConfig(**{"latency": 0.0, "tokens_per_second": 0.0, **overrides})
            runner, port = await start(config)
            runners.append(runner)
            return Sim(f"http://127.0.0.1:{port}", runner.app, session)

        yield _serve
    for runner in runners:
        await runner.cleanup()


# ---------------------------------------------------------------- captions and usage


async def test_captions_differ_between_two_real_images_of_the_same_size(serve: Serve) -> None:
    sim = await serve()  # both are 512x512: the colours and layout must tell them apart
    assert await sim.caption("astronaut.png") != await sim.caption("camera.png")


async def test_caption_mentions_the_real_width_and_height(serve: Serve) -> None:
    sim = await serve()
    assert "451x300" in await sim.caption("chelsea.png")
    assert "640x427" in await sim.caption("rocket.jpg")


async def test_caption_is_deterministic_for_the_same_image_and_prompt(serve: Serve) -> None:
    sim = await serve()
    assert await sim.caption("coffee.png") == await sim.caption("coffee.png")


async def test_stream_usage_matches_the_claude_formula(serve: Serve) -> None:
    sim = await serve()
    _, _, text = await sim.chat(chat_body("chelsea.png"))
    objs = chunks(text)
    content = [o for o in objs if o["choices"] and o["choices"][0]["delta"].get("content")]
    usage, prompt = objs[-1]["usage"], claude_tokens(451, 300) + TEXT_TOKENS
    assert objs[-1]["choices"] == []
    assert usage["prompt_tokens"] == prompt
    assert usage["completion_tokens"] == len(content)
    assert usage["total_tokens"] == prompt + len(content)


def test_claude_image_tokens_downscale_to_1568_edge_and_1_15_megapixels() -> None:
    assert claude_image_tokens(1000, 872) == claude_tokens(1000, 872)  # under both limits
    assert claude_image_tokens(3136, 784) == claude_tokens(1568, 392)  # long edge binds
    assert claude_image_tokens(3136, 1568) == claude_tokens(1516, 758)  # area binds


async def test_stream_events_are_role_content_finish_usage_then_done(serve: Serve) -> None:
    sim = await serve()
    status, headers, text = await sim.chat(chat_body())
    objs = chunks(text)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert re.fullmatch(r"req_[0-9a-f]+", headers["x-request-id"])
    assert parse_sse(text)[-1] == (None, "[DONE]") and text.endswith("data: [DONE]\n\n")
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert objs[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(o["choices"][0]["finish_reason"] is None for o in objs[:-2])
    assert {o["id"] for o in objs} == {objs[0]["id"]} and objs[0]["id"].startswith("chatcmpl-")
    assert {(o["object"], o["model"]) for o in objs} == {("chat.completion.chunk", "sim-model")}


async def test_stream_without_include_usage_has_no_usage_chunk(serve: Serve) -> None:
    sim = await serve()
    _, _, text = await sim.chat(chat_body(usage=False))
    objs = chunks(text)
    assert all(o["choices"] for o in objs) and all("usage" not in o for o in objs)


async def test_max_tokens_cuts_the_stream_with_finish_length(serve: Serve) -> None:
    sim = await serve()
    _, _, text = await sim.chat(chat_body("chelsea.png", max_tokens=5))
    objs = chunks(text)
    assert objs[-2]["choices"][0]["finish_reason"] == "length"
    assert objs[-1]["usage"]["completion_tokens"] == 5
    assert len(split_tokens(caption_of(objs))) == 5


async def test_non_stream_returns_a_chat_completion(serve: Serve) -> None:
    sim = await serve()
    status, headers, text = await sim.chat(chat_body("rocket.jpg", stream=False))
    completion = json.loads(text)
    content = completion["choices"][0]["message"]["content"]
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert completion["object"] == "chat.completion" and "640x427" in content
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["completion_tokens"] == len(split_tokens(content))


async def test_n2_streams_two_interleaved_choices(serve: Serve) -> None:
    sim = await serve()
    _, _, text = await sim.chat(chat_body("horse.png", n=2))
    objs = [o for o in chunks(text) if o["choices"]]
    indices = [o["choices"][0]["index"] for o in objs]
    finishes = {o["choices"][0]["index"]: o["choices"][0]["finish_reason"] for o in objs[-2:]}
    assert set(indices) == {0, 1} and indices[:4] == [0, 1, 0, 1]
    assert finishes == {0: "stop", 1: "stop"}
    assert caption_of(objs, 0) != caption_of(objs, 1)
    assert "400x328" in caption_of(objs, 0) and "400x328" in caption_of(objs, 1)


async def test_url_image_is_not_fetched_and_is_priced_as_1024x768(serve: Serve) -> None:
    sim = await serve()
    url = "https://images.invalid/photos/kayak.jpg"
    _, _, text = await sim.chat(chat_body(url=url, stream=False))
    completion = json.loads(text)
    assert "kayak.jpg" in completion["choices"][0]["message"]["content"]
    assert completion["usage"]["prompt_tokens"] == claude_tokens(1024, 768) + TEXT_TOKENS


async def test_plain_string_content_is_accepted(serve: Serve) -> None:
    sim = await serve()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    status, _, text = await sim.chat({"model": "m", "messages": messages})
    assert status == 200 and json.loads(text)["choices"][0]["message"]["content"]


# ---------------------------------------------------------------- request errors

NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"hello").decode()


@pytest.mark.parametrize(
    "url",
    ["data:image/png;base64,!!not-base64!!", NOT_AN_IMAGE, "data:image/png,raw"],
    ids=["not-base64", "not-an-image", "not-a-base64-uri"],
)
async def test_undecodable_image_is_400_invalid_image(serve: Serve, url: str) -> None:
    sim = await serve()
    status, _, text = await sim.chat(chat_body(url=url))
    error = {"message": "Invalid image.", "type": "invalid_request_error", "param": None}
    assert status == 400 and json.loads(text) == {"error": {**error, "code": None}}


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[]", b'{"model":"m"}', b'{"model":"m","messages":[]}']
)
async def test_bad_body_or_missing_messages_is_400(serve: Serve, raw: bytes) -> None:
    sim = await serve()
    status, _, text = await sim.chat(data=raw)
    assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error"


async def test_invalid_key_is_401_and_the_key_is_not_echoed(serve: Serve) -> None:
    sim = await serve()
    headers = {"Authorization": "Bearer sk-invalid"}
    status, _, text = await sim.chat(chat_body(), headers=headers)
    assert status == 401 and "sk-invalid" not in text
    assert json.loads(text)["error"]["code"] == "invalid_api_key"


async def test_missing_key_is_accepted(serve: Serve) -> None:
    sim = await serve()
    assert (await sim.chat(chat_body()))[0] == 200


# ---------------------------------------------------------------- injected faults


@pytest.mark.parametrize(
    ("mode", "status", "retry_after", "content_type"),
    [
        ("429", 429, "1", "application/json"),
        ("500", 500, None, "application/json"),
        ("502html", 502, None, "text/html"),
        ("503", 503, "1", "application/json"),
        ("529", 529, None, "application/json"),
    ],
)
async def test_http_fault_modes_answer_their_status(
    serve: Serve, mode: str, status: int, retry_after: str | None, content_type: str
) -> None:
    sim = await serve(fail_rate=1.0, fail_modes=(mode,))
    got, headers, text = await sim.chat(chat_body())
    assert (got, headers.get("Retry-After")) == (status, retry_after)
    assert headers["Content-Type"].startswith(content_type)
    if content_type == "application/json":
        assert json.loads(text)["error"]["message"]
    assert sim.stats.faults[mode] == 1


async def test_truncate_fault_cuts_the_connection_mid_stream(serve: Serve) -> None:
    sim = await serve(fail_rate=1.0, fail_modes=("truncate",))
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        url = sim.base + "/v1/chat/completions"
        async with sim.session.post(url, json=chat_body()) as response:
            async for piece in response.content.iter_any():
                received += piece
    objs = chunks(received.decode())
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant" and caption_of(objs)
    assert b"[DONE]" not in received and b'"finish_reason":"stop"' not in received


async def test_error_event_fault_sends_an_error_object_then_done(serve: Serve) -> None:
    sim = await serve(fail_rate=1.0, fail_modes=("error_event",))
    status, _, text = await sim.chat(chat_body())
    events = [data for _, data in parse_sse(text)]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert caption_of(chunks(text)[:-1])  # some content came first


async def test_stall_fault_goes_silent_and_is_released_on_disconnect(serve: Serve) -> None:
    sim = await serve(fail_rate=1.0, fail_modes=("stall",))
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        with pytest.raises(asyncio.TimeoutError):
            async with client.post(sim.base + "/v1/chat/completions", json=chat_body()) as r:
                await r.read()
    for _ in range(50):  # the handler must notice the hang-up, not sleep for an hour
        if sim.stats.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert sim.stats.in_flight == 0


async def test_stall_fault_does_not_delay_server_shutdown() -> None:
    runner, port = await start(SimConfig(latency=0, fail_rate=1.0, fail_modes=("stall",)))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession() as client:
        request = asyncio.create_task(client.post(url, json=chat_body()))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 2.0
        response = await request
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_bad_json_fault_sends_an_unparseable_chunk(serve: Serve) -> None:
    sim = await serve(fail_rate=1.0, fail_modes=("bad_json",))
    _, _, text = await sim.chat(chat_body())
    assert [data for _, data in parse_sse(text)][-2:] == ["{not json", "[DONE]"]
    assert '"finish_reason":"stop"' not in text


async def test_done_no_finish_fault_ends_without_a_finish_reason(serve: Serve) -> None:
    sim = await serve(fail_rate=1.0, fail_modes=("done_no_finish",))
    _, _, text = await sim.chat(chat_body())
    objs = chunks(text)
    assert text.endswith("data: [DONE]\n\n") and caption_of(objs)
    assert all(c["finish_reason"] is None for o in objs for c in o["choices"])


async def test_faults_follow_the_seed_in_arrival_order(serve: Serve) -> None:
    runs = []
    for _ in range(2):
        sim = await serve(fail_rate=0.5, fail_modes=("500",), seed=7)
        runs.append([(await sim.chat(chat_body(stream=False)))[0] for _ in range(8)])
    assert runs[0] == runs[1] and set(runs[0]) == {200, 500}


# ---------------------------------------------------------------- rate limits


async def test_rpm_limit_answers_429_with_retry_after_and_headers(serve: Serve) -> None:
    sim = await serve(rpm=2, window=6.0)
    replies = [await sim.chat(chat_body(stream=False)) for _ in range(3)]
    _, headers, text = replies[2]
    error = json.loads(text)["error"]
    assert [status for status, _, _ in replies] == [200, 200, 429]
    assert 2.0 <= float(headers["Retry-After"]) <= 3.0  # one request refills every 3 s
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert GO_DURATION.fullmatch(headers["x-ratelimit-reset-requests"])
    assert error["code"] == "rate_limit_exceeded" and "Please try again in" in error["message"]
    assert (sim.stats.requests_total, sim.stats.requests_429) == (3, 1)
    assert len(sim.stats.accepted_at) == 2


async def test_tpm_bucket_refunds_unused_max_tokens(serve: Serve) -> None:
    sim = await serve(tpm=100_000, window=1e9)  # refill is negligible during the test
    _, _, text = await sim.chat(chat_body(stream=False, max_tokens=300))
    used = json.loads(text)["usage"]["total_tokens"]
    status, headers, _ = await sim.chat(data=b"{")  # a 400: reports the bucket, takes nothing
    assert status == 400 and int(headers["x-ratelimit-remaining-tokens"]) == 100_000 - used
    assert sim.stats.tokens_served == used


async def test_request_larger_than_tpm_is_429_without_retry_after(serve: Serve) -> None:
    sim = await serve(tpm=100)
    status, headers, text = await sim.chat(chat_body())
    assert status == 429 and "Retry-After" not in headers
    assert json.loads(text)["error"]["message"].startswith("Request too large")


async def test_rate_limit_headers_can_be_disabled(serve: Serve) -> None:
    sim = await serve(rpm=10, rate_limit_headers=False)
    _, headers, _ = await sim.chat(chat_body())
    assert not [name for name in headers if name.lower().startswith("x-ratelimit")]


async def test_sliding_limiter_refuses_until_the_oldest_request_ages_out(serve: Serve) -> None:
    sim = await serve(limiter="sliding", rpm=2, window=30.0)
    replies = [await sim.chat(chat_body(stream=False)) for _ in range(3)]
    status, headers, _ = replies[2]
    assert [r[0] for r in replies] == [200, 200, 429]
    assert 29.0 <= float(headers["Retry-After"]) <= 30.1  # a bucket would say ~15 s
    assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_fixed_limiter_reports_the_time_until_its_window_turns(serve: Serve) -> None:
    sim = await serve(limiter="fixed", rpm=5, window=3600.0)
    _, headers, _ = await sim.chat(chat_body(stream=False))
    left = 3600.0 - time.monotonic() % 3600.0
    reset = headers["x-ratelimit-reset-requests"]
    assert GO_DURATION.fullmatch(reset) and headers["x-ratelimit-remaining-requests"] == "4"
    assert abs(_go_seconds(reset) - left) < 2.0


async def test_concurrency_limiter_refuses_while_full_and_sends_no_rate_headers(
    serve: Serve,
) -> None:
    sim = await serve(limiter="concurrency", max_in_flight=1, latency=0.3)
    first = asyncio.ensure_future(sim.chat(chat_body(stream=False)))
    await asyncio.sleep(0.1)
    status, headers, text = await sim.chat(chat_body(stream=False))
    assert status == 429 and headers["Retry-After"] == "1"
    assert "concurrent" in json.loads(text)["error"]["message"]
    assert not [h for h in headers if h.lower().startswith("x-ratelimit")]
    assert (await first)[0] == 200
    assert (await sim.chat(chat_body(stream=False)))[0] == 200  # its place was given back


async def test_retry_after_none_sends_neither_the_header_nor_the_hint(serve: Serve) -> None:
    sim = await serve(rpm=1, window=60.0, retry_after="none")
    await sim.chat(chat_body(stream=False))
    status, headers, text = await sim.chat(chat_body(stream=False))
    assert status == 429 and "Retry-After" not in headers
    assert "try again" not in json.loads(text)["error"]["message"]
    assert headers["x-ratelimit-remaining-requests"] == "0"  # headers are another flag


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
async def test_retry_after_literal_values_are_sent_as_given(serve: Serve, value: str) -> None:
    sim = await serve(rpm=1, window=60.0, retry_after=value)
    await sim.chat(chat_body(stream=False))
    status, headers, text = await sim.chat(chat_body(stream=False))
    assert status == 429 and headers["Retry-After"] == value
    assert "try again" not in json.loads(text)["error"]["message"]


async def test_a_storm_answers_429_for_its_seconds_from_the_first_request(serve: Serve) -> None:
    sim = await serve(storm=0.4)
    first = await sim.chat(chat_body(stream=False))
    second = await sim.chat(chat_body(stream=False))
    await asyncio.sleep(0.45)
    after = await sim.chat(chat_body(stream=False))
    assert [first[0], second[0], after[0]] == [429, 429, 200]
    assert first[1]["Retry-After"] == "1"
    assert sim.stats.requests_429 == 2


async def test_rate_headers_tell_the_state_at_admission_not_when_the_head_goes_out(
    serve: Serve,
) -> None:
    # Both requests are admitted before either head is sent (0.3 s to first token):
    # the first one's headers must not count the second.
    sim = await serve(rpm=10, window=600.0, latency=0.3)
    first = asyncio.ensure_future(sim.chat(chat_body()))
    await asyncio.sleep(0.1)
    second = await sim.chat(chat_body())
    assert (await first)[1]["x-ratelimit-remaining-requests"] == "9"
    assert second[1]["x-ratelimit-remaining-requests"] == "8"


def _go_seconds(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (1.5, "1.5s"), (360.0, "6m0s"), (3725.0, "1h2m5s"), (0.0, "0s")],
)
def test_go_duration_formats_like_openai(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


# ---------------------------------------------------------------- Anthropic route


async def test_anthropic_stream_has_the_reference_event_sequence(serve: Serve) -> None:
    sim = await serve()
    status, headers, text = await sim.anthropic(anthropic_body("chelsea.png"))
    names = [name for name, _ in parse_sse(text)]
    objs = [json.loads(data) for _, data in parse_sse(text)]
    deltas = [o["delta"]["text"] for o in objs if o["type"] == "content_block_delta"]
    assert status == 200 and headers["request-id"].startswith("req_")
    assert names == [
        "message_start", "content_block_start", "ping", *["content_block_delta"] * len(deltas),
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert [o["type"] for o in objs] == names
    assert objs[0]["message"]["usage"]["input_tokens"] == claude_tokens(451, 300) + TEXT_TOKENS
    assert objs[-2]["delta"]["stop_reason"] == "end_turn"
    assert objs[-2]["usage"]["output_tokens"] == len(deltas)
    assert "451x300" in "".join(deltas)


async def test_anthropic_non_stream_returns_a_message(serve: Serve) -> None:
    sim = await serve()
    status, _, text = await sim.anthropic(anthropic_body("rocket.jpg", "image/jpeg", False))
    message = json.loads(text)
    assert status == 200 and message["type"] == "message" and message["stop_reason"] == "end_turn"
    assert "640x427" in message["content"][0]["text"]


async def test_anthropic_media_type_mismatch_is_400_in_anthropic_shape(serve: Serve) -> None:
    sim = await serve()
    status, headers, text = await sim.anthropic(anthropic_body("rocket.jpg", "image/png"))
    body = json.loads(text)
    assert status == 400 and headers["x-should-retry"] == "false"
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "does not match the provided media type" in body["error"]["message"]


async def test_anthropic_error_event_fault_is_an_overloaded_event(serve: Serve) -> None:
    sim = await serve(fail_rate=1.0, fail_modes=("error_event",))
    _, _, text = await sim.anthropic(anthropic_body())
    name, data = parse_sse(text)[-1]
    assert name == "error" and json.loads(data)["error"]["type"] == "overloaded_error"
    assert "message_stop" not in text


async def test_anthropic_rate_limit_uses_anthropic_headers(serve: Serve) -> None:
    sim = await serve(rpm=1, window=60.0)
    await sim.anthropic(anthropic_body())
    status, headers, text = await sim.anthropic(anthropic_body())
    reset = headers["anthropic-ratelimit-requests-reset"]
    assert status == 429 and headers["retry-after"] == "60"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", reset)
    assert json.loads(text)["error"]["type"] == "rate_limit_error"


# ---------------------------------------------------------------- pacing, other routes, CLI


async def test_latency_and_tokens_per_second_pace_the_stream(serve: Serve) -> None:
    sim = await serve(latency=0.2, tokens_per_second=100.0)
    started = time.monotonic()
    _, _, text = await sim.chat(chat_body())
    pieces = chunks(text)[-1]["usage"]["completion_tokens"]
    assert time.monotonic() - started >= 0.2 + (pieces - 1) / 100.0 - 0.02


async def test_models_and_health_routes(serve: Serve) -> None:
    sim = await serve()
    async with sim.session.get(sim.base + "/v1/models") as response:
        assert (await response.json())["data"][0]["id"]
    async with sim.session.get(sim.base + "/health") as response:
        assert response.status == 200 and await response.text() == "ok"


def test_split_tokens_pieces_rejoin_to_the_text() -> None:
    text = "A 512x512 RGB PNG photograph dominated by grey, black and white tones."
    pieces = split_tokens(text)
    assert "".join(pieces) == text and max(len(p.strip()) for p in pieces) <= 4


@pytest.mark.parametrize(
    "argv", [["--fail-rate", "2"], ["--bogus"], ["--fail-modes", "nope"], ["--rpm", "x"],
             ["--limiter", "leaky"], ["--limiter", "concurrency"], ["--storm", "-1"]],
)
def test_cli_bad_flags_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert simulator_cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1


def test_cli_prints_the_listening_line_and_exits_0_on_sigterm() -> None:
    command = [sys.executable, "-m", "pipeline.simulator", "--port", "0", "--latency", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
    ) as process:
        try:
            line = process.stdout.readline() if process.stdout else ""
            assert re.fullmatch(r"simulator listening on http://127\.0\.0\.1:\d+/v1\n", line)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
