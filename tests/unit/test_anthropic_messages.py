"""The Anthropic Messages adapter: request shape and event folding (docs/protocol.md §3, §8-§10).

Streams are real bytes fed through pipeline.sse.SSEDecoder exactly as the worker feeds
them, so framing and folding are tested together; one test talks to the simulator's
POST /v1/messages over HTTP.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.errors import Retryable, RowFailed
from pipeline.records import Completion, ManifestRow, PreparedImage
from pipeline.settings import Secret, Settings
from pipeline.simulator.app import SimConfig, start
from pipeline.wire.adapters.anthropic_messages import AnthropicMessages, MessagesStreamState
from pipeline.wire.options import RequestOptions
from pipeline.wire.sse import SSEDecoder

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "sample"

# docs/protocol.md §3.2, byte for byte (ping with a space inside its JSON included).
REF_32 = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_01CapA","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1612,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"A red kayak rests"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" on a pebble beach."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":12}}

event: message_stop
data: {"type":"message_stop"}

"""
CAPTION = "A red kayak rests on a pebble beach."


def ev(name: str, **fields: Any) -> bytes:
    """One named event whose JSON ``type`` repeats the name, as Anthropic sends it."""
    return f"event: {name}\ndata: {json.dumps({'type': name, **fields})}\n\n".encode()


def start_ev(usage: dict[str, Any] | None = None) -> bytes:
    usage = usage or {"input_tokens": 100, "output_tokens": 1}
    return ev("message_start", message={"id": "msg_1", "type": "message", "role": "assistant",
                                        "content": [], "model": "claude-x", "stop_reason": None,
                                        "usage": usage})


def text(t: str, index: int = 0) -> bytes:
    return ev("content_block_delta", index=index, delta={"type": "text_delta", "text": t})


def stop_delta(reason: str | None, **usage: Any) -> bytes:
    return ev("message_delta", delta={"stop_reason": reason, "stop_sequence": None},
              usage=usage or {"output_tokens": 5})


STOP = ev("message_stop")


def run(chunks: list[bytes]) -> tuple[Completion, MessagesStreamState]:
    """Decode and fold as pipeline.worker.Worker._stream does, EOF included."""
    decoder, state = SSEDecoder(), MessagesStreamState()
    clock = iter(range(10**6))
    for chunk in chunks:
        for event in decoder.feed(chunk):
            if state.on_event(event, float(next(clock))):
                return state.finish(), state
    for event in decoder.finish():
        if state.on_event(event, float(next(clock))):
            break
    return state.finish(), state


def fold(*parts: bytes) -> Completion:
    return run([b"".join(parts)])[0]


# ---------------------------------------------------------------- streams


def test_c36_reference_stream() -> None:
    c, state = run([REF_32])
    assert (c.text, c.finish_reason, c.finish_reason_raw, c.terminal) == (
        CAPTION, "stop", "end_turn", "message_stop")
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens,
            c.usage.cached_tokens) == (1612, 12, 1624, 0)
    assert (c.model, c.response_id) == ("claude-sonnet-4-5", "msg_01CapA")
    assert state.first_content_at is not None and c.quirks == {}


def test_c36_split_at_every_byte_boundary() -> None:
    expected = run([REF_32])[0]
    for i in range(len(REF_32) + 1):
        assert run([REF_32[:i], REF_32[i:]])[0] == expected, f"split at byte {i}"
    assert run([REF_32[i:i + 1] for i in range(len(REF_32))])[0] == expected


def test_crlf_stream_fed_byte_by_byte() -> None:
    crlf = REF_32.replace(b"\n", b"\r\n")
    c = run([crlf[i:i + 1] for i in range(len(crlf))])[0]
    assert (c.text, c.terminal) == (CAPTION, "message_stop")


def test_first_content_at_is_the_first_non_empty_text() -> None:
    _, state = run([start_ev(), text(""), text("Hi"), text(" there."), stop_delta("end_turn"),
                    STOP])
    assert state.first_content_at == 2.0  # events 0 and 1 carried no text


def test_c37_in_stream_overloaded_is_retryable() -> None:
    err = ev("error", error={"type": "overloaded_error", "message": "Overloaded"})
    with pytest.raises(Retryable) as e:
        fold(start_ev(), text("A partial"), err)
    assert e.value.error_class == "overloaded" and e.value.http_status == 200


def test_in_stream_api_error_is_retryable_and_invalid_request_fails_the_row() -> None:
    with pytest.raises(Retryable):
        fold(start_ev(), ev("error", error={"type": "api_error", "message": "Internal"}))
    with pytest.raises(RowFailed):
        fold(start_ev(), ev("error", error={"type": "invalid_request_error",
                                            "message": "prompt is too long"}))


def test_c38_truncated_after_content_block_stop_is_retryable() -> None:
    with pytest.raises(Retryable) as e:
        fold(start_ev(), text("A half"), ev("content_block_stop", index=0))
    assert e.value.error_class == "stream_broken" and "message_stop" in e.value.message


def test_message_stop_without_stop_reason_is_retryable() -> None:
    with pytest.raises(Retryable):
        fold(start_ev(), text("Words."), ev("content_block_stop", index=0), STOP)


def test_clean_eof_after_stop_reason_is_accepted() -> None:
    c = fold(start_ev(), text("Words."), stop_delta("end_turn"))
    assert (c.text, c.terminal) == ("Words.", "eof_after_finish")


def test_thinking_and_signature_stay_out_of_the_caption() -> None:
    c = fold(
        start_ev(),
        ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
        ev("content_block_delta", index=0, delta={"type": "thinking_delta",
                                                  "thinking": "Looks like a boat."}),
        ev("content_block_delta", index=0, delta={"type": "signature_delta",
                                                  "signature": "EqQBCgIYAh"}),
        ev("content_block_stop", index=0),
        ev("content_block_start", index=1, content_block={"type": "text", "text": ""}),
        text("A boat.", index=1), ev("content_block_stop", index=1),
        stop_delta("end_turn"), STOP)
    assert c.text == "A boat."


def test_cache_tokens_are_summed_into_the_prompt() -> None:
    usage = {"input_tokens": 20, "cache_creation_input_tokens": 100,
             "cache_read_input_tokens": 1500, "output_tokens": 1}
    c = fold(start_ev(usage), text("Cached."),
             stop_delta("end_turn", output_tokens=9, input_tokens=None,
                        cache_read_input_tokens=None), STOP)
    assert c.usage is not None  # nulls in message_delta do not erase message_start's counts
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens,
            c.usage.cached_tokens) == (1620, 9, 1629, 1500)


def test_message_delta_usage_is_cumulative_and_overwrites() -> None:
    c = fold(start_ev({"input_tokens": 5, "output_tokens": 1}), text("X."),
             stop_delta(None, output_tokens=4), stop_delta("end_turn", input_tokens=8,
                                                           output_tokens=11), STOP)
    assert c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens) == (8, 11)


def test_max_tokens_is_a_length_success() -> None:
    c = fold(start_ev(), text("A long and"), stop_delta("max_tokens"), STOP)
    assert (c.finish_reason, c.finish_reason_raw, c.text) == ("length", "max_tokens",
                                                              "A long and")


def test_refusal_fails_the_row() -> None:
    with pytest.raises(RowFailed) as e:
        fold(start_ev(), text("I can't help."), stop_delta("refusal"), STOP)
    assert e.value.error_class == "refused" and e.value.finish_reason_raw == "refusal"
    assert e.value.usage is not None


def test_empty_caption_fails_the_row() -> None:
    with pytest.raises(RowFailed) as e:
        fold(start_ev(), text(""), stop_delta("end_turn"), STOP)
    assert e.value.error_class == "empty"


def test_ping_unknown_and_unnamed_events() -> None:
    unnamed = b'data: {"type":"content_block_delta","index":0,' \
              b'"delta":{"type":"text_delta","text":" two"}}\n\n'
    c = fold(start_ev(), b": keep-alive\n\n", ev("ping"), b"event: ping\ndata:\n\n",
             ev("brand_new_event", x=1),
             text("One"), unnamed, stop_delta("end_turn"), STOP)
    assert c.text == "One two"


def test_raw_json_error_line_is_classified() -> None:
    raw = b'{"error":{"type":"invalid_request_error","message":"bad image"}}\n'
    with pytest.raises(RowFailed):
        fold(start_ev(), raw)
    with pytest.raises(Retryable):
        fold(start_ev(), b'{"type":"error","error":{"type":"overloaded_error"}}\n')


def test_openai_style_error_data_from_a_gateway_is_classified() -> None:
    with pytest.raises(RowFailed):
        fold(start_ev(), b'data: {"error":{"type":"invalid_request_error","message":"no"}}\n\n')


def test_invalid_json_is_a_broken_stream() -> None:
    with pytest.raises(Retryable) as e:
        fold(start_ev(), b"event: content_block_delta\ndata: {not json\n\n")
    assert e.value.error_class == "stream_broken"


def test_second_message_start_after_text_restarts_the_fold() -> None:
    c, state = run([start_ev(), text("First try"), start_ev(), text("Second try."),
                    stop_delta("end_turn"), STOP])
    assert c.text == "Second try." and c.quirks["generation_restarted"] == 1


# ---------------------------------------------------------------- non-streamed bodies


def test_from_json_message_and_errors() -> None:
    doc = {"id": "msg_9", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "A cat."}],
           "stop_reason": "end_turn",
           "usage": {"input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 4}}
    c = AnthropicMessages().from_json(doc)
    assert (c.text, c.finish_reason, c.terminal, c.response_id) == ("A cat.", "stop", "json",
                                                                     "msg_9")
    assert c.usage is not None and (c.usage.prompt_tokens, c.usage.cached_tokens) == (100, 90)
    with pytest.raises(Retryable) as e:
        AnthropicMessages().from_json(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert e.value.error_class == "overloaded"
    with pytest.raises(RowFailed):
        AnthropicMessages().from_json(
            {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}})
    with pytest.raises(Retryable):
        AnthropicMessages().from_json({**doc, "stop_reason": None})
    with pytest.raises(Retryable):
        AnthropicMessages().from_json(["not", "a", "message"])


# ---------------------------------------------------------------- requests


def settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {"manifest": SAMPLES / "images.csv", "out": tmp_path / "out",
                            "base_url": "http://127.0.0.1/v1", "api_key": Secret("sk-ant-test"),
                            "model": "claude-sonnet-4-5", "api": "anthropic", "max_tokens": 200}
    base.update(kw)
    if "temperature" in base:  # sampling options live in RequestOptions
        base["options"] = RequestOptions(temperature=base.pop("temperature"))
    return Settings(**base)


ROW = ManifestRow("r1", "horse.png", "Write one caption.", 2, {})


def test_request_for_a_data_uri_image_with_system_prompt(tmp_path: Path) -> None:
    payload = base64.b64encode(b"\x89PNG fake").decode()
    image = PreparedImage(f"data:image/png;base64,{payload}", "image/png", 9, 800, 600)
    s = settings(tmp_path, system="You caption photos.", temperature=0.2)
    req = AnthropicMessages().build_request(ROW, image, s.request_spec)
    body = json.loads(req.body)
    assert body == {
        "model": "claude-sonnet-4-5", "max_tokens": 200, "stream": True,
        "system": "You caption photos.", "temperature": 0.2,
        "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": payload}},
            {"type": "text", "text": "Write one caption."}]}],
    }
    assert (req.path, req.headers) == ("/messages", {"Accept": "text/event-stream"})
    assert req.est_input_tokens > 640 and req.est_output_tokens == 200  # 800x600/750 + text


def test_request_for_a_url_image_with_row_prompt(tmp_path: Path) -> None:
    image = PreparedImage("https://example.com/a.jpg", None, None)
    row = ManifestRow("r2", "https://example.com/a.jpg", "Name the animal.", 3, {})
    spec = settings(tmp_path).request_spec
    body = json.loads(AnthropicMessages().build_request(row, image, spec).body)
    assert "system" not in body and "temperature" not in body
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        {"type": "text", "text": "Name the animal."}]}]


def test_auth_headers() -> None:
    a = AnthropicMessages()
    assert a.auth_headers("sk-ant-1") == {"x-api-key": "sk-ant-1",
                                          "anthropic-version": "2023-06-01"}
    assert a.auth_headers("") == {"anthropic-version": "2023-06-01"}
    assert (a.name, a.path) == ("anthropic", "/messages")


# ---------------------------------------------------------------- against the simulator


def sample_jpeg() -> PreparedImage:
    # Built here rather than by pipeline.images, so only this adapter is under test.
    data = (SAMPLES / "rocket.jpg").read_bytes()
    uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    return PreparedImage(uri, "image/jpeg", len(data))


@pytest.mark.parametrize("image", [sample_jpeg(),
                                   PreparedImage("https://example.com/kayak.jpg", None, None)],
                         ids=["data-uri", "https-url"])
async def test_simulator_messages_route_end_to_end(tmp_path: Path, image: PreparedImage) -> None:
    runner, port = await start(SimConfig(latency=0, tokens_per_second=0))
    adapter = AnthropicMessages()
    s = settings(tmp_path, base_url=f"http://127.0.0.1:{port}/v1")
    req = adapter.build_request(ManifestRow("r", image.url[:40], "Caption it.", 2, {}), image,
                                s.request_spec)
    headers = {"Content-Type": "application/json", **req.headers,
               **adapter.auth_headers(s.api_key.reveal())}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(s.endpoint + req.path, data=req.body, headers=headers) as r:
                assert r.status == 200, await r.text()
                assert r.content_type == "text/event-stream"
                chunks = [chunk async for chunk in r.content.iter_any()]
            stream_off = json.dumps({**json.loads(req.body), "stream": False}).encode()
            async with http.post(s.endpoint + req.path, data=stream_off, headers=headers) as r:
                whole = adapter.from_json(await r.json())
    finally:
        await runner.cleanup()
    c, state = run(chunks)
    assert c.text.strip() and c.finish_reason == "stop" and c.terminal == "message_stop"
    assert c.response_id and c.response_id.startswith("msg_") and state.first_content_at
    assert c.usage is not None and c.usage.prompt_tokens and c.usage.completion_tokens
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert whole.text == c.text and whole.usage is not None
    assert whole.usage.prompt_tokens == c.usage.prompt_tokens
