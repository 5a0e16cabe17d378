"""The simulator's Responses and Gemini dialects and its new traits, read over real HTTP
with a tiny parser of this file's own (not the client's: the simulator is what the
client is tested against, so the two must not share code)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.simulator.app import SimConfig, start

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "sample"
IMAGE = "data:image/png;base64," + base64.b64encode((SAMPLES / "camera.png").read_bytes()).decode()
PROMPT = "Describe this image."


def events(text: str) -> list[tuple[str | None, Any]]:
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            out.append((name, json.loads("\n".join(data))))
    return out


@pytest.fixture
async def sim() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    runner, port = await start(SimConfig(latency=0, tokens_per_second=0, split_bytes=5))
    try:
        async with aiohttp.ClientSession() as session:
            yield f"http://127.0.0.1:{port}", session
    finally:
        await runner.cleanup()


async def post(sim: Any, path: str, body: dict[str, Any], key: str = "sk-ok-123456"
               ) -> tuple[int, str]:
    base, session = sim
    headers = {"Authorization": f"Bearer {key}", "x-goog-api-key": key}
    async with session.post(base + path, json=body, headers=headers) as r:
        return r.status, await r.text()


def responses_body(prompt: str = PROMPT, **extra: Any) -> dict[str, Any]:
    content = [{"type": "input_text", "text": prompt}, {"type": "input_image", "image_url": IMAGE}]
    return {"model": "gpt-sim", "input": [{"role": "user", "content": content}],
            "stream": True, **extra}


def gemini_body(prompt: str = PROMPT, **config: Any) -> dict[str, Any]:
    data = IMAGE.partition(",")[2]
    parts = [{"inline_data": {"mime_type": "image/png", "data": data}}, {"text": prompt}]
    return {"contents": [{"role": "user", "parts": parts}], "generationConfig": config}


async def test_a_responses_stream_numbers_every_event_and_ends_completed(sim: Any) -> None:
    status, text = await post(sim, "/v1/responses", responses_body())
    evs = events(text)
    assert status == 200 and "[DONE]" not in text
    assert all(name == doc["type"] for name, doc in evs)
    assert [doc["sequence_number"] for _, doc in evs] == list(range(len(evs)))
    assert evs[-1][1]["type"] == "response.completed"
    streamed = "".join(d["delta"] for _, d in evs if d["type"] == "response.output_text.delta")
    final = evs[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == streamed
    assert final["usage"]["output_tokens"] > 0


async def test_the_gap_trigger_loses_exactly_one_sequence_number(sim: Any) -> None:
    _, text = await post(sim, "/v1/responses", responses_body(f"[gap] {PROMPT}"))
    numbers = [doc["sequence_number"] for _, doc in events(text)]
    assert len(set(range(numbers[-1] + 1)) - set(numbers)) == 1


async def test_a_small_max_output_tokens_is_incomplete(sim: Any) -> None:
    _, text = await post(sim, "/v1/responses", responses_body(max_output_tokens=3))
    last = events(text)[-1][1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_gemini_streams_bare_chunks_that_end_with_a_finish_reason(sim: Any) -> None:
    path = "/v1beta/models/gemini-sim:streamGenerateContent?alt=sse"
    status, text = await post(sim, path, gemini_body())
    evs = events(text)
    assert status == 200 and all(name is None for name, _ in evs)
    assert evs[-1][1]["candidates"][0]["finishReason"] == "STOP"
    streamed = "".join(p.get("text", "") for _, d in evs
                       for p in d["candidates"][0]["content"]["parts"])
    _, whole = await post(sim, "/v1beta/models/gemini-sim:generateContent", gemini_body())
    doc = json.loads(whole)
    assert doc["candidates"][0]["content"]["parts"][0]["text"] == streamed
    assert doc["usageMetadata"]["promptTokenCount"] > 0


async def test_a_thinking_gemini_model_reports_its_thoughts_apart(sim: Any) -> None:
    _, whole = await post(sim, "/v1beta/models/sim-thinking:generateContent",
                          gemini_body(thinkingConfig={"thinkingBudget": 1024}))
    doc = json.loads(whole)
    parts = doc["candidates"][0]["content"]["parts"]
    assert parts[0]["thought"] is True and "thought" not in parts[1]
    assert doc["usageMetadata"]["thoughtsTokenCount"] == 48  # the budget stands for low effort


async def test_gemini_answers_a_wrong_key_the_way_the_real_api_does(sim: Any) -> None:
    status, text = await post(sim, "/v1beta/models/g:generateContent", gemini_body(),
                              key="sk-invalid")
    error = json.loads(text)["error"]
    assert (status, error["status"], error["details"][0]["reason"]) == (
        400, "INVALID_ARGUMENT", "API_KEY_INVALID")


async def test_an_unknown_gemini_method_is_404(sim: Any) -> None:
    status, _ = await post(sim, "/v1beta/models/g:countTokens", gemini_body())
    assert status == 404


async def test_a_chat_request_with_tools_is_answered_with_a_call(sim: Any) -> None:
    body = {"model": "m", "stream": False, "tools": [{"type": "function", "function": {
        "name": "caption", "parameters": {"type": "object"}}}], "messages": [
        {"role": "user", "content": [{"type": "text", "text": PROMPT},
                                     {"type": "image_url", "image_url": {"url": IMAGE}}]}]}
    _, text = await post(sim, "/v1/chat/completions", body)
    choice = json.loads(text)["choices"][0]
    call = choice["message"]["tool_calls"][0]["function"]
    assert choice["finish_reason"] == "tool_calls" and call["name"] == "caption"
    assert set(json.loads(call["arguments"])) == {"caption"}


async def test_the_refuse_trigger_is_an_anthropic_refusal(sim: Any) -> None:
    content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": IMAGE.partition(",")[2]}},
               {"type": "text", "text": f"[refuse] {PROMPT}"}]
    body = {"model": "claude-sim", "max_tokens": 300,
            "messages": [{"role": "user", "content": content}]}
    _, text = await post(sim, "/v1/messages", body)
    assert json.loads(text)["stop_reason"] == "refusal"
