"""The options every protocol maps its own way: --no-stream, --tool-schema,
--reasoning-effort, --detail (docs/protocol.md §14.3, §16), and the worker's one retry
of a reasoning_exhausted answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import RowFailed, RunFatal
from pipeline.images.load import ImageSource
from pipeline.images.prepare import ImagePolicy
from pipeline.pacing.cost import CostBudget, Price
from pipeline.pacing.limiter import Budgets, Limiter
from pipeline.pacing.retry import RetryPolicy
from pipeline.records import ManifestRow, PreparedImage
from pipeline.run.worker import REASONING_RETRY_FACTOR, Worker
from pipeline.settings import Secret, Settings
from pipeline.wire.adapters import get_adapter
from pipeline.wire.adapters.anthropic_messages import MessagesStreamState
from pipeline.wire.adapters.base import RequestSpec
from pipeline.wire.adapters.openai_chat import ChatStreamState
from pipeline.wire.channel import ScriptedTransport
from pipeline.wire.options import RequestOptions, load_tool_schema
from pipeline.wire.sse import SSEDecoder
from pipeline.wire.tokens import image_tokens, thinking_tokens

ROW = ManifestRow("r1", "a.jpg", "Describe.", 2, {})
IMAGE = PreparedImage("data:image/jpeg;base64,/9j/", "image/jpeg", 10, 2048, 2048)
SCHEMA = {"type": "object", "properties": {"caption": {"type": "string"}}}


def body(api: str, stream: bool = True, max_tokens: int = 300, **options: Any
         ) -> dict[str, Any]:
    spec = RequestSpec("gpt-4o", max_tokens, None, RequestOptions(**options), stream)
    adapter = get_adapter(api)
    adapter.check(spec)
    return json.loads(adapter.build_request(ROW, IMAGE, spec).body)


def check(api: str, max_tokens: int = 300, **options: Any) -> RunFatal:
    with pytest.raises(RunFatal) as e:
        get_adapter(api).check(RequestSpec("m", max_tokens, None, RequestOptions(**options)))
    assert e.value.exit_code == 2
    return e.value


# ---------------------------------------------------------------- --no-stream

@pytest.mark.parametrize("api", ["openai", "anthropic", "responses"])
def test_no_stream_asks_for_a_json_completion(api: str) -> None:
    b = body(api, stream=False)
    assert b["stream"] is False and "stream_options" not in b
    spec = RequestSpec("m", 300, None, RequestOptions(), False)
    assert get_adapter(api).build_request(ROW, IMAGE, spec).headers["Accept"] == \
        "application/json"


# ---------------------------------------------------------------- --detail

def test_detail_low_estimates_the_base_cost_alone() -> None:
    assert image_tokens("gpt-4o", (2048, 2048), "low") == 85
    assert image_tokens("gpt-4o", (2048, 2048), "high") == 85 + 170 * 4
    assert image_tokens("gpt-4o", (2048, 2048), "auto") == image_tokens("gpt-4o", (2048, 2048))
    assert image_tokens("claude-3-5-sonnet", (800, 600), "low") == \
        image_tokens("claude-3-5-sonnet", (800, 600))  # not an OpenAI-style part


def test_detail_rides_on_the_openai_style_image_parts() -> None:
    assert body("openai", detail="low")["messages"][-1]["content"][1]["image_url"][
        "detail"] == "low"
    assert body("responses", detail="high")["input"][0]["content"][1]["detail"] == "high"


@pytest.mark.parametrize("api", ["anthropic", "gemini"])
def test_detail_elsewhere_exits_2_naming_it(api: str) -> None:
    assert "--detail" in check(api, detail="low").message


# ---------------------------------------------------------------- --reasoning-effort

def test_openai_sends_reasoning_effort_even_none() -> None:
    assert body("openai", reasoning_effort="none")["reasoning_effort"] == "none"


def test_anthropic_thinking_budget_follows_the_effort_and_fits_max_tokens() -> None:
    assert body("anthropic", reasoning_effort="none")["thinking"] == {"type": "disabled"}
    assert body("anthropic", max_tokens=4000, reasoning_effort="low")["thinking"] == {
        "type": "enabled", "budget_tokens": 2048}
    assert body("anthropic", max_tokens=4000, reasoning_effort="high")["thinking"] == {
        "type": "enabled", "budget_tokens": 3999}


def test_anthropic_thinking_needs_room_above_1024_tokens() -> None:
    assert "--max-tokens above 1024" in check("anthropic", max_tokens=800,
                                              reasoning_effort="low").message


def test_anthropic_cannot_force_a_tool_while_thinking() -> None:
    assert "--tool-schema" in check("anthropic", max_tokens=4000, reasoning_effort="low",
                                    tool_schema=SCHEMA).message


def test_a_thinking_model_is_known_to_think_more_than_a_plain_one() -> None:
    assert thinking_tokens("gpt-5-mini", None) > 300
    assert thinking_tokens("gpt-5-mini", "none") == 0
    assert thinking_tokens("gpt-4o", None) == thinking_tokens("claude-3-5-sonnet", None) == 0


# ---------------------------------------------------------------- --tool-schema

def test_openai_forces_the_one_caption_function() -> None:
    b = body("openai", tool_schema=SCHEMA)
    assert b["tools"] == [{"type": "function", "function": {
        "name": "caption", "description": b["tools"][0]["function"]["description"],
        "parameters": SCHEMA}}]
    assert b["tool_choice"] == {"type": "function", "function": {"name": "caption"}}


def test_anthropic_and_responses_force_it_their_way() -> None:
    a = body("anthropic", tool_schema=SCHEMA)
    assert a["tools"][0]["input_schema"] == SCHEMA
    assert a["tool_choice"] == {"type": "tool", "name": "caption"}
    r = body("responses", tool_schema=SCHEMA)
    assert r["tools"][0]["parameters"] == SCHEMA and r["tools"][0]["type"] == "function"
    assert r["tool_choice"] == {"type": "function", "name": "caption"}


@pytest.mark.parametrize("text,why", [('["not", "an object"]', "must be an object"),
                                      ('{"type": "string"}', "must be an object"),
                                      ("{nope", "not valid JSON")])
def test_a_tool_schema_that_is_no_object_schema_exits_2(tmp_path: Path, text: str,
                                                        why: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(RunFatal) as e:
        load_tool_schema(str(path))
    assert e.value.exit_code == 2 and why in e.value.message


def test_a_tool_schema_and_a_response_format_are_one_too_many() -> None:
    with pytest.raises(RunFatal):
        RequestOptions(tool_schema=SCHEMA, response_format={"type": "json_object"})


def fold(state: Any, raw: bytes) -> Any:
    decoder = SSEDecoder()
    for event in [*decoder.feed(raw), *decoder.finish()]:
        if state.on_event(event, 0.0):
            break
    return state.finish()


def test_openai_tool_call_arguments_accumulate_per_call_index() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        doc = {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(doc)}\n\n".encode()
    args = '{"caption": "A kayak."}'
    raw = (chunk({"role": "assistant", "content": None})
           + chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                    "function": {"name": "caption", "arguments": args[:7]}}]})
           + chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[7:]}}]})
           + chunk({}, "tool_calls") + b"data: [DONE]\n\n")
    c = fold(ChatStreamState(), raw)
    assert (c.text, c.finish_reason) == (args, "tool_calls")


def test_openai_refusal_text_makes_the_row_refused() -> None:
    doc = {"id": "c", "choices": [{"index": 0, "delta": {"refusal": "I can't."},
                                   "finish_reason": "stop"}]}
    with pytest.raises(RowFailed) as e:
        fold(ChatStreamState(), f"data: {json.dumps(doc)}\n\ndata: [DONE]\n\n".encode())
    assert e.value.error_class == "refused" and "I can't." in e.value.message


def a_event(name: str, **fields: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **fields})}\n\n".encode()


def test_anthropic_thinking_stays_out_and_exhausts_a_length_finish() -> None:
    raw = (a_event("message_start", message={"id": "m", "model": "claude", "usage": {}})
           + a_event("content_block_delta", index=0,
                     delta={"type": "thinking_delta", "thinking": "Hmm, " * 40})
           + a_event("content_block_delta", index=1, delta={"type": "text_delta", "text": "A"})
           + a_event("message_delta", delta={"stop_reason": "max_tokens"},
                     usage={"output_tokens": 60})
           + a_event("message_stop"))
    with pytest.raises(RowFailed) as e:
        fold(MessagesStreamState(), raw)
    assert e.value.error_class == "reasoning_exhausted"


def test_anthropic_input_json_deltas_are_the_caption() -> None:
    raw = (a_event("message_start", message={"id": "m", "model": "claude", "usage": {}})
           + a_event("content_block_start", index=0,
                     content_block={"type": "tool_use", "name": "caption", "input": {}})
           + a_event("content_block_delta", index=0,
                     delta={"type": "input_json_delta", "partial_json": '{"caption": "A'})
           + a_event("content_block_delta", index=0,
                     delta={"type": "input_json_delta", "partial_json": ' kayak."}'})
           + a_event("message_delta", delta={"stop_reason": "tool_use"}, usage={})
           + a_event("message_stop"))
    assert fold(MessagesStreamState(), raw).text == '{"caption": "A kayak."}'


# ---------------------------------------------------------------- the worker's one retry

def _exhausted() -> Any:
    chunks = [
        b'data: {"id":"c","choices":[{"index":0,"delta":{"reasoning_content":"'
        + b"x" * 200 + b'"},"finish_reason":null}]}\n\n',
        b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"length"}],'
        b'"usage":{"prompt_tokens":10,"completion_tokens":100,'
        b'"completion_tokens_details":{"reasoning_tokens":100}}}\n\n',
        b"data: [DONE]\n\n"]
    return (200, {"content-type": "text/event-stream"}, chunks)


OK = (200, {"content-type": "text/event-stream"}, [
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"A kayak."},'
    b'"finish_reason":"stop"}]}\n\n', b"data: [DONE]\n\n"])


def _worker(tmp_path: Path, script: list[Any], max_cost: float | None = None
            ) -> tuple[Worker, ScriptedTransport]:
    settings = Settings(manifest=tmp_path / "m.csv", out=tmp_path / "out",
                        base_url="http://127.0.0.1:1/v1", api_key=Secret("sk-unit-test-1"),
                        max_tokens=100, model="gpt-5-mini")

    async def no_sleep(s: float) -> None:
        return None

    transport = ScriptedTransport(script)
    budget = CostBudget(Price(1.0, 1000.0), max_cost) if max_cost is not None else None
    w = Worker(settings, get_adapter("openai"), transport,
               ImageSource(tmp_path, ImagePolicy(max_bytes=1 << 20)),
               Limiter(Budgets(), 4, sleep=no_sleep), RetryPolicy(retries=3, base=0.0, cap=0.0),
               sleep=no_sleep, budget=budget)
    return w, transport


URL_ROW = ManifestRow("a", "http://img.test/a.jpg", None, 2, {})


async def test_reasoning_exhausted_is_sent_once_more_with_more_room(tmp_path: Path) -> None:
    w, t = _worker(tmp_path, [_exhausted(), OK])
    row = await w.process(URL_ROW)
    assert (row.status, row.caption, row.attempts) == ("ok", "A kayak.", 2)
    sent = [json.loads(r.body)["max_tokens"] for r in t.sent]
    assert sent == [100, 100 * REASONING_RETRY_FACTOR]


async def test_reasoning_exhausted_twice_is_an_error_row(tmp_path: Path) -> None:
    w, t = _worker(tmp_path, [_exhausted(), _exhausted()])
    row = await w.process(URL_ROW)
    assert (row.status, row.error_class, row.attempts, len(t.sent)) == (
        "error", "reasoning_exhausted", 2, 2)
    assert row.reasoning_tokens == 100 and row.finish_reason == "length"


async def test_no_larger_retry_when_the_cost_budget_cannot_hold_it(tmp_path: Path) -> None:
    # $1000 per million output tokens: 100 tokens fit in $0.2, 400 do not.
    w, t = _worker(tmp_path, [_exhausted(), OK], max_cost=0.2)
    row = await w.process(URL_ROW)
    assert (row.status, row.error_class, len(t.sent)) == ("error", "reasoning_exhausted", 1)


# ---------------------------------------------------------------- the dry run's warning

async def _dry(tmp_path: Path, capsys: pytest.CaptureFixture[str], **settings: Any
               ) -> list[str]:
    import io

    from pipeline.commands.dryrun import dry_run

    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image\na,http://img.test/a.jpg\n")
    s = Settings(manifest=manifest, out=tmp_path / "out", base_url="", api_key=Secret(""),
                 dry_run=True, **settings)
    capsys.readouterr()
    await dry_run(s, io.StringIO())
    return [ln for ln in capsys.readouterr().err.splitlines() if "thinking" in ln]


async def test_the_dry_run_warns_when_max_tokens_is_below_known_thinking(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    warned = await _dry(tmp_path, capsys, model="gpt-5-mini", max_tokens=300)
    assert len(warned) == 1 and "--max-tokens 300" in warned[0]


async def test_the_dry_run_is_quiet_for_a_model_that_does_not_think(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await _dry(tmp_path, capsys, model="gpt-4o", max_tokens=300) == []


def test_a_tool_schema_that_is_no_json_schema_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.schema.json"
    path.write_text('{"type": "object", "properties": {"caption": {"type": 5}}}')
    with pytest.raises(RunFatal, match="not a valid JSON Schema .*properties/caption/type"):
        load_tool_schema(str(path))


def test_a_caption_nested_beyond_any_parser_is_invalid_json_not_a_crash() -> None:
    from pipeline.errors import Retryable
    from pipeline.wire.response import structured_columns

    options = RequestOptions(tool_schema={"type": "object"})
    with pytest.raises(Retryable) as caught:
        structured_columns('{"a":' * 100_000 + "1" + "}" * 100_000, options)
    assert caught.value.error_class == "invalid_json"


async def test_a_stream_chunk_nested_beyond_any_parser_fails_its_row_not_the_batch() -> None:
    import time

    from pipeline.errors import RowFailed
    from pipeline.wire.adapters.openai_chat import OpenAIChat
    from pipeline.wire.response import ResponseReader

    async def chunks():  # type: ignore[no-untyped-def]
        yield b'data: {"choices": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}\n\n"

    reader = ResponseReader(OpenAIChat(), 1, 1 << 20, 16 << 20, time.monotonic)
    with pytest.raises(RowFailed) as caught:
        await reader.stream(chunks())
    assert caught.value.error_class == "bad_response"
