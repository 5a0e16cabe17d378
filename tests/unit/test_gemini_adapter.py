"""The native Gemini adapter: request shape, chunk folding and the JSON completion
(docs/protocol.md §15).

Streams are real bytes fed through pipeline.wire.sse.SSEDecoder as the worker feeds
them; the stream has no terminator, so every fold ends at EOF.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.errors import Retryable, RowFailed, RunFatal, classify_http
from pipeline.records import Completion, ManifestRow, PreparedImage
from pipeline.wire.adapters.base import RequestSpec
from pipeline.wire.adapters.gemini import Gemini, GeminiStreamState
from pipeline.wire.options import RequestOptions
from pipeline.wire.sse import SSEDecoder

CAPTION = "A red kayak rests on a pebble beach."
USAGE = {"promptTokenCount": 1290, "candidatesTokenCount": 12, "thoughtsTokenCount": 30,
         "totalTokenCount": 1332, "cachedContentTokenCount": 256}


def chunk(parts: list[dict[str, Any]] | None = None, finish: str | None = None,
          usage: dict[str, Any] | None = None, **extra: Any) -> bytes:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts or []},
                                 "index": 0}
    if finish:
        candidate["finishReason"] = finish
    doc: dict[str, Any] = {"candidates": [candidate], "modelVersion": "gemini-2.5-flash",
                           "responseId": "r-1", **extra}
    if usage:
        doc["usageMetadata"] = usage
    return f"data: {json.dumps(doc)}\r\n\r\n".encode()


def run(chunks: list[bytes]) -> Completion:
    decoder, state = SSEDecoder(), GeminiStreamState()
    for c in chunks:
        for event in decoder.feed(c):
            state.on_event(event, 0.0)
    for event in decoder.finish():
        state.on_event(event, 0.0)
    return state.finish()


STREAM = (chunk([{"text": "Looking at the boat.", "thought": True}])
          + chunk([{"text": "A red kayak"}])
          + chunk([{"text": " rests on a pebble beach."}], "STOP", USAGE))


def test_text_parts_fold_and_thoughts_stay_out() -> None:
    c = run([STREAM])
    assert (c.text, c.finish_reason, c.finish_reason_raw, c.terminal) == (
        CAPTION, "stop", "STOP", "eof_after_finish")
    assert (c.model, c.response_id) == ("gemini-2.5-flash", "r-1")


def test_usage_counts_thoughts_as_output() -> None:
    u = run([STREAM]).usage
    assert u is not None
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens,
            u.reasoning_tokens) == (1290, 42, 1332, 256, 30)


def test_every_split_of_the_bytes_folds_to_the_same_completion() -> None:
    expected = run([STREAM])
    for i in range(len(STREAM) + 1):
        assert run([STREAM[:i], STREAM[i:]]) == expected, f"split at byte {i}"


def test_an_eof_without_finish_reason_is_a_broken_stream() -> None:
    with pytest.raises(Retryable) as e:
        run([chunk([{"text": "A red kayak"}])])
    assert e.value.error_class == "stream_broken"


@pytest.mark.parametrize("finish", ["SAFETY", "RECITATION", "PROHIBITED_CONTENT", "BLOCKLIST",
                                    "SPII", "IMAGE_SAFETY"])
def test_safety_finishes_are_refused(finish: str) -> None:
    with pytest.raises(RowFailed) as e:
        run([chunk([{"text": "A red"}]), chunk([], finish)])
    assert e.value.error_class == "refused" and e.value.finish_reason_raw == finish


def test_a_blocked_prompt_is_refused() -> None:
    body = f'data: {json.dumps({"promptFeedback": {"blockReason": "OTHER"}})}\n\n'.encode()
    with pytest.raises(RowFailed) as e:
        run([body])
    assert e.value.error_class == "refused" and "blocked" in e.value.message


def test_max_tokens_is_a_length_finish() -> None:
    c = run([chunk([{"text": "A red kayak"}], "MAX_TOKENS",
                   {"promptTokenCount": 9, "candidatesTokenCount": 3})])
    assert (c.text, c.finish_reason, c.finish_reason_raw) == ("A red kayak", "length",
                                                              "MAX_TOKENS")


def test_max_tokens_after_mostly_thinking_is_reasoning_exhausted() -> None:
    usage = {"promptTokenCount": 9, "candidatesTokenCount": 2, "thoughtsTokenCount": 98}
    with pytest.raises(RowFailed) as e:
        run([chunk([{"text": "A", "thought": False}], "MAX_TOKENS", usage)])
    assert e.value.error_class == "reasoning_exhausted"


def test_a_function_call_s_args_are_the_caption() -> None:
    c = run([chunk([{"functionCall": {"name": "caption", "args": {"caption": CAPTION}}}],
                   "STOP", USAGE)])
    assert json.loads(c.text) == {"caption": CAPTION}


def test_a_malformed_function_call_is_invalid_json_retried() -> None:
    with pytest.raises(Retryable) as e:
        run([chunk([], "MALFORMED_FUNCTION_CALL")])
    assert e.value.error_class == "invalid_json"


@pytest.mark.parametrize("code,status,cls,kind", [
    (500, "INTERNAL", "stream_error", Retryable),
    (429, "RESOURCE_EXHAUSTED", "rate_limit", Retryable),
    (400, "INVALID_ARGUMENT", "bad_request", RowFailed),
])
def test_an_error_in_the_stream_is_classified(code: int, status: str, cls: str,
                                              kind: type) -> None:
    err = json.dumps({"error": {"code": code, "message": "x", "status": status}})
    with pytest.raises(kind) as e:
        run([chunk([{"text": "A red"}]), f"data: {err}\n\n".encode()])
    assert e.value.error_class == cls


def test_a_wrong_key_answered_400_is_fatal_for_the_run() -> None:
    body = json.dumps([{"error": {"code": 400, "message": "API key not valid. Please pass a "
                                  "valid API key.", "status": "INVALID_ARGUMENT",
                                  "details": [{"reason": "API_KEY_INVALID"}]}}]).encode()
    e = classify_http(400, {}, body)
    assert isinstance(e, RunFatal) and e.error_class == "auth"


def test_the_json_completion_folds_like_the_stream() -> None:
    doc = {"candidates": [{"content": {"parts": [{"text": CAPTION}]}, "finishReason": "STOP"}],
           "usageMetadata": USAGE}
    c = Gemini().from_json(doc)
    assert (c.text, c.finish_reason, c.terminal) == (CAPTION, "stop", "json")


def _build(options: RequestOptions, url: str = "data:image/png;base64,iVBOR",
           stream: bool = True, system: str | None = "Be brief.") -> tuple[str, dict[str, Any]]:
    row = ManifestRow("r1", "a.png", "Describe.", 2, {})
    image = PreparedImage(url, "image/png" if url.startswith("data:") else None, 10, 10, 10)
    req = Gemini().build_request(row, image, RequestSpec("gemini-2.5-flash", 300, system,
                                                         options, stream))
    return req.path, json.loads(req.body)


def test_the_path_names_the_model_and_the_method() -> None:
    assert _build(RequestOptions())[0] == \
        "/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert _build(RequestOptions(), stream=False)[0] == "/models/gemini-2.5-flash:generateContent"


def test_local_images_are_inline_data_and_urls_file_data() -> None:
    _, body = _build(RequestOptions())
    assert body["contents"][0]["parts"][0] == {"inline_data": {"mime_type": "image/png",
                                                               "data": "iVBOR"}}
    _, body = _build(RequestOptions(), url="https://img.example/a/b.webp")
    assert body["contents"][0]["parts"][0] == {"file_data": {
        "mime_type": "image/webp", "file_uri": "https://img.example/a/b.webp"}}


def test_generation_config_carries_the_options_in_gemini_s_names() -> None:
    _, body = _build(RequestOptions(temperature=0.2, top_p=0.9, stop=("END",), seed=7,
                                    reasoning_effort="none"))
    assert body["generationConfig"] == {"maxOutputTokens": 300, "temperature": 0.2, "topP": 0.9,
                                        "seed": 7, "stopSequences": ["END"],
                                        "thinkingConfig": {"thinkingBudget": 0}}
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}


def test_a_tool_schema_is_one_forced_function() -> None:
    schema = {"type": "object", "properties": {"caption": {"type": "string"}}}
    _, body = _build(RequestOptions(tool_schema=schema))
    assert body["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"] == schema
    assert body["toolConfig"] == {"functionCallingConfig": {
        "mode": "ANY", "allowedFunctionNames": ["caption"]}}


def test_the_key_goes_in_x_goog_api_key() -> None:
    assert Gemini().auth_headers("k-123456789") == {"x-goog-api-key": "k-123456789"}
