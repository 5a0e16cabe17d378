"""The Responses adapter: request shape, event folding and the JSON completion
(docs/protocol.md §14).

Streams are real bytes fed through pipeline.wire.sse.SSEDecoder as the worker feeds
them, so framing and folding are tested together.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.errors import Retryable, RowFailed, RunFatal
from pipeline.records import Completion, ManifestRow, PreparedImage
from pipeline.wire.adapters.base import RequestSpec
from pipeline.wire.adapters.openai_responses import OpenAIResponses, ResponsesStreamState
from pipeline.wire.options import RequestOptions
from pipeline.wire.sse import SSEDecoder

CAPTION = "A red kayak rests on a pebble beach."
USAGE = {"input_tokens": 900, "input_tokens_details": {"cached_tokens": 100},
         "output_tokens": 60, "output_tokens_details": {"reasoning_tokens": 48},
         "total_tokens": 960}


class Seq:
    """Typed events numbered as the API numbers them (``skip`` loses one number)."""

    def __init__(self, skip: int | None = None) -> None:
        self.n, self.skip = 0, skip

    def __call__(self, kind: str, **fields: Any) -> bytes:
        if self.n == self.skip:
            self.n += 1
        data = json.dumps({"type": kind, "sequence_number": self.n, **fields})
        self.n += 1
        return f"event: {kind}\ndata: {data}\n\n".encode()


def response(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "model": "gpt-5-mini", "status": status,
            **extra}


def stream(ev: Seq, texts: list[str], end: bytes | None = None) -> bytes:
    parts = [ev("response.created", response=response("in_progress")),
             ev("response.output_item.added", output_index=0,
                item={"type": "message", "id": "msg_1", "content": []}),
             ev("response.content_part.added", item_id="msg_1", output_index=0,
                content_index=0, part={"type": "output_text", "text": ""})]
    parts += [ev("response.output_text.delta", item_id="msg_1", output_index=0,
                 content_index=0, delta=t) for t in texts]
    parts.append(ev("response.output_text.done", text="".join(texts)))
    if end is None:
        end = ev("response.completed", response=response("completed", usage=USAGE))
    return b"".join(parts) + end


def run(chunks: list[bytes]) -> Completion:
    decoder, state = SSEDecoder(), ResponsesStreamState()
    for chunk in chunks:
        for event in decoder.feed(chunk):
            if state.on_event(event, 0.0):
                return state.finish()
    for event in decoder.finish():
        if state.on_event(event, 0.0):
            break
    return state.finish()


def test_a_completed_stream_folds_its_text_deltas_with_usage() -> None:
    c = run([stream(Seq(), ["A red kayak", " rests on a pebble beach."])])
    assert (c.text, c.finish_reason, c.finish_reason_raw, c.terminal) == (
        CAPTION, "stop", "completed", "completed")
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens,
            c.usage.cached_tokens, c.usage.reasoning_tokens) == (900, 60, 960, 100, 48)
    assert (c.model, c.response_id, c.quirks) == ("gpt-5-mini", "resp_1", {})


def test_every_split_of_the_bytes_folds_to_the_same_completion() -> None:
    body = stream(Seq(), ["A red kayak", " rests on a pebble beach."])
    expected = run([body])
    for i in range(len(body) + 1):
        assert run([body[:i], body[i:]]) == expected, f"split at byte {i}"


def test_a_sequence_gap_is_a_quirk_not_a_failure() -> None:
    c = run([stream(Seq(skip=3), [CAPTION])])
    assert c.text == CAPTION and c.quirks == {"sequence_gap": 1}


def test_event_types_the_client_does_not_know_are_ignored() -> None:
    ev = Seq()
    extra = (ev("response.reasoning_summary_text.delta", delta="Thinking about kayaks")
             + ev("response.future_thing.delta", delta="?")
             + ev("response.web_search_call.in_progress", item_id="ws_1"))
    body = stream(ev, [CAPTION])
    c = run([extra + body])
    assert c.text == CAPTION  # reasoning summaries never enter the caption


def test_incomplete_at_max_output_tokens_is_a_length_finish() -> None:
    ev = Seq()
    end = ev("response.incomplete", response=response(
        "incomplete", incomplete_details={"reason": "max_output_tokens"}, usage=USAGE | {
            "output_tokens_details": {"reasoning_tokens": 0}}))
    c = run([stream(ev, ["A red kayak"], end)])
    assert (c.text, c.finish_reason, c.finish_reason_raw) == (
        "A red kayak", "length", "max_output_tokens")


def test_incomplete_after_mostly_reasoning_is_reasoning_exhausted() -> None:
    ev = Seq()
    end = ev("response.incomplete", response=response(
        "incomplete", incomplete_details={"reason": "max_output_tokens"}, usage=USAGE))
    with pytest.raises(RowFailed) as e:
        run([stream(ev, ["A"], end)])
    assert e.value.error_class == "reasoning_exhausted"
    assert e.value.usage is not None and e.value.usage.reasoning_tokens == 48


def test_incomplete_for_the_content_filter_is_refused() -> None:
    ev = Seq()
    end = ev("response.incomplete", response=response(
        "incomplete", incomplete_details={"reason": "content_filter"}))
    with pytest.raises(RowFailed) as e:
        run([stream(ev, ["A red"], end)])
    assert e.value.error_class == "refused" and e.value.finish_reason_raw == "content_filter"


def test_a_refusal_part_is_refused_with_its_text() -> None:
    ev = Seq()
    body = (ev("response.created", response=response("in_progress"))
            + ev("response.refusal.delta", delta="I can't help")
            + ev("response.refusal.delta", delta=" with that.")
            + ev("response.completed", response=response("completed", usage=USAGE)))
    with pytest.raises(RowFailed) as e:
        run([body])
    assert e.value.error_class == "refused" and "I can't help with that." in e.value.message


def test_function_call_arguments_are_the_caption() -> None:
    ev = Seq()
    args = json.dumps({"caption": CAPTION})
    body = (ev("response.created", response=response("in_progress"))
            + b"".join(ev("response.function_call_arguments.delta", item_id="fc_1",
                          output_index=0, delta=args[i:i + 5]) for i in range(0, len(args), 5))
            + ev("response.completed", response=response("completed", usage=USAGE)))
    assert run([body]).text == args


@pytest.mark.parametrize("code,cls,kind", [
    ("server_error", "stream_error", Retryable), ("rate_limit_exceeded", "rate_limit", Retryable),
    ("invalid_image_format", "bad_image", RowFailed), ("invalid_prompt", "bad_request", RowFailed),
])
def test_response_failed_is_classified_by_its_error_code(code: str, cls: str,
                                                         kind: type) -> None:
    ev = Seq()
    end = ev("response.failed", response=response(
        "failed", error={"code": code, "message": f"failed: {code}"}))
    with pytest.raises(kind) as e:
        run([stream(ev, ["A red"], end)])
    assert e.value.error_class == cls


def test_an_error_event_mid_stream_ends_the_attempt() -> None:
    ev = Seq()
    err = ev("error", code="server_error", message="The server had an error", param=None)
    with pytest.raises(Retryable) as e:
        run([stream(ev, ["A red"], err)])
    assert e.value.error_class == "stream_error"


def test_an_eof_before_response_completed_is_a_broken_stream() -> None:
    with pytest.raises(Retryable) as e:
        run([stream(Seq(), ["A red"], b"")])
    assert e.value.error_class == "stream_broken"


def test_the_json_completion_gives_the_same_caption_and_usage() -> None:
    doc = response("completed", usage=USAGE, output=[
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "id": "msg_1", "content": [{"type": "output_text", "text": CAPTION}]}])
    c = OpenAIResponses().from_json(doc)
    assert (c.text, c.finish_reason, c.terminal) == (CAPTION, "stop", "json")
    assert c.usage is not None and c.usage.reasoning_tokens == 48


def _request(options: RequestOptions, stream: bool = True) -> dict[str, Any]:
    row = ManifestRow("r1", "a.jpg", "Describe.", 2, {})
    image = PreparedImage("data:image/jpeg;base64,/9j/", "image/jpeg", 10, 10, 10)
    spec = RequestSpec("gpt-5-mini", 300, "Be brief.", options, stream)
    req = OpenAIResponses().build_request(row, image, spec)
    assert req.path == "/responses"
    return json.loads(req.body)


def test_the_request_has_input_parts_instructions_and_max_output_tokens() -> None:
    body = _request(RequestOptions(detail="low", reasoning_effort="minimal"))
    assert body["input"] == [{"role": "user", "content": [
        {"type": "input_text", "text": "Describe."},
        {"type": "input_image", "image_url": "data:image/jpeg;base64,/9j/", "detail": "low"}]}]
    assert (body["instructions"], body["max_output_tokens"], body["stream"]) == (
        "Be brief.", 300, True)
    assert body["reasoning"] == {"effort": "minimal"}


def test_a_json_schema_goes_into_text_format() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"},
                                                  "strict": True}}
    body = _request(RequestOptions(response_format=fmt), stream=False)
    assert body["text"] == {"format": {"type": "json_schema", "name": "c",
                                       "schema": {"type": "object"}, "strict": True}}
    assert body["stream"] is False


def test_options_the_responses_api_lacks_exit_2() -> None:
    spec = RequestSpec("gpt-5-mini", 300, None, RequestOptions(stop=("END",)))
    with pytest.raises(RunFatal) as e:
        OpenAIResponses().check(spec)
    assert e.value.exit_code == 2 and "--stop" in e.value.message
