"""Values from the wire become typed, valid values or a permanent error, never a crash.

One generation per caption (a replayed answer restarts the fold, never concatenates),
wrongly typed fields (coerced where the meaning is clear, ``bad_response`` where not),
and text that is always valid UTF-8 (docs/protocol.md §11).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.errors import Retryable, RowFailed
from pipeline.records import Completion
from pipeline.wire.adapters.anthropic_messages import AnthropicMessages, MessagesStreamState
from pipeline.wire.adapters.openai_chat import ChatStreamState, OpenAIChat
from pipeline.wire.sse import Event, SSEDecoder

DONE = Event("message", "[DONE]")


def chunk(content: Any = None, finish: Any = None, rid: Any = "c1", role: bool = False,
          model: Any = "m", index: int = 0, usage: dict[str, Any] | None = None) -> Event:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    if role:
        delta["role"] = "assistant"
    doc: dict[str, Any] = {"id": rid, "model": model, "choices": [
        {"index": index, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        doc = {"id": rid, "choices": [], "usage": usage}
    return Event("message", json.dumps(doc))


def fold(*events: Event) -> Completion:
    s = ChatStreamState()
    for i, e in enumerate(events):
        if s.on_event(e, float(i)):
            break
    return s.finish()


def fold_raw(*chunks: bytes) -> Completion:
    """Bytes through the SSE decoder, as the worker feeds them."""
    decoder, state = SSEDecoder(), ChatStreamState()
    for c in chunks:
        for e in decoder.feed(c):
            if state.on_event(e, 0.0):
                return state.finish()
    return state.finish()


# ---------------------------------------------------------------- one generation


def test_a_second_role_chunk_with_the_same_id_restarts_the_caption() -> None:
    c = fold(chunk("", role=True), chunk("A partial"), chunk("", role=True),
             chunk("A red kayak on a beach."), chunk(finish="stop"), DONE)
    assert c.text == "A red kayak on a beach."
    assert c.quirks["generation_restarted"] == 1


def test_a_replay_under_a_new_id_with_a_role_chunk_keeps_only_the_new_text() -> None:
    c = fold(chunk("", rid="msg_A", role=True), chunk("partial", rid="msg_A"),
             chunk("", rid="msg_B", role=True), chunk("Complete.", rid="msg_B"),
             chunk(finish="stop", rid="msg_B"), DONE)
    assert (c.text, c.response_id) == ("Complete.", "msg_B")
    assert c.quirks["generation_restarted"] == 1


def test_text_under_a_new_id_without_a_role_chunk_is_retried() -> None:
    with pytest.raises(Retryable) as e:
        fold(chunk("partial", rid="a"), chunk(" more", rid="b"), chunk(finish="stop"), DONE)
    assert e.value.error_class == "stream_broken"


def test_role_repeated_on_every_content_chunk_is_one_generation() -> None:
    c = fold(chunk("", role=True), chunk("A red", role=True), chunk(" kayak.", role=True),
             chunk("", role=True, finish="stop"), chunk("", role=True, finish=""), DONE)
    assert c.text == "A red kayak." and "generation_restarted" not in c.quirks


def test_a_finish_chunk_that_repeats_the_role_keeps_the_caption() -> None:
    c = fold(chunk("", role=True), chunk("A red kayak."), chunk("", role=True, finish="stop"),
             DONE)
    assert c.text == "A red kayak."


def test_a_trailing_usage_chunk_under_another_id_is_accepted() -> None:
    c = fold(chunk("", role=True), chunk("A kayak."), chunk(finish="stop"),
             chunk(rid="other", usage={"prompt_tokens": 5, "completion_tokens": 3}), DONE)
    assert c.text == "A kayak." and c.usage is not None and c.usage.total_tokens == 8


def test_list_valued_content_parts_are_joined() -> None:
    c = fold(chunk([{"type": "text", "text": "A red"}, {"type": "text", "text": " kayak."}]),
             chunk(finish="stop"), DONE)
    assert c.text == "A red kayak."


def test_a_model_switch_mid_stream_is_a_quirk() -> None:
    c = fold(chunk("A", model="m1"), chunk(" kayak.", model="m2"),
             chunk(finish="stop", model="m2"), DONE)
    assert c.quirks["model_changed"] == 1 and c.model == "m2"


def test_an_anthropic_content_index_reset_restarts_the_caption() -> None:
    s = MessagesStreamState()
    events = [("message_start", {"message": {"id": "m", "model": "c"}}),
              ("content_block_start", {"index": 0, "content_block": {"type": "text"}}),
              ("content_block_delta", {"delta": {"type": "text_delta", "text": "Part"}}),
              ("content_block_start", {"index": 0, "content_block": {"type": "text"}}),
              ("content_block_delta", {"delta": {"type": "text_delta", "text": "Whole."}}),
              ("message_delta", {"delta": {"stop_reason": "end_turn"}}), ("message_stop", {})]
    for name, fields in events:
        s.on_event(Event(name, json.dumps({"type": name, **fields})), 0.0)
    c = s.finish()
    assert c.text == "Whole." and c.quirks["generation_restarted"] == 1


# ---------------------------------------------------------------- wrongly typed fields


def test_a_numeric_model_and_id_are_kept_as_text() -> None:
    c = fold(chunk("A kayak.", rid=42, model=123), chunk(finish="stop", rid=42, model=123),
             DONE)
    assert (c.model, c.response_id) == ("123", "42")


def test_an_object_as_model_is_dropped_and_counted() -> None:
    c = fold(chunk("A kayak.", model={"x": 1}), chunk(finish="stop", model=None), DONE)
    assert c.model is None and c.quirks["bad_model"] == 1


@pytest.mark.parametrize("finish", [7, True, {"r": "stop"}, ["stop"]])
def test_a_finish_reason_that_is_not_text_fails_the_row_permanently(finish: Any) -> None:
    with pytest.raises(RowFailed) as e:
        fold(chunk("A kayak."), chunk(finish=finish), DONE)
    assert e.value.error_class == "bad_response"


@pytest.mark.parametrize("content", [5, True, {"text": "x"}])
def test_content_of_another_type_fails_the_row_permanently(content: Any) -> None:
    with pytest.raises(RowFailed) as e:
        fold(chunk(content), chunk(finish="stop"), DONE)
    assert e.value.error_class == "bad_response"


def test_choices_that_are_not_a_list_fail_the_row_permanently() -> None:
    with pytest.raises(RowFailed) as e:
        ChatStreamState().on_event(Event("message", '{"id":"a","choices":{"0":1}}'), 0.0)
    assert e.value.error_class == "bad_response"


def test_an_anthropic_stop_reason_that_is_a_number_fails_the_row() -> None:
    s = MessagesStreamState()
    s.on_event(Event("message_start", '{"type":"message_start","message":{"id":"m"}}'), 0.0)
    with pytest.raises(RowFailed) as e:
        s.on_event(Event("message_delta", '{"type":"message_delta","delta":{"stop_reason":1}}'),
                   0.0)
    assert e.value.error_class == "bad_response"


@pytest.mark.parametrize("usage", [{"prompt_tokens": 10**30, "completion_tokens": 2},
                                   {"prompt_tokens": -5, "completion_tokens": "7"},
                                   {"prompt_tokens": True, "completion_tokens": 2.5}])
def test_token_counts_that_are_not_counts_are_dropped(usage: dict[str, Any]) -> None:
    c = fold(chunk("A kayak."), chunk(finish="stop"), chunk(usage=usage), DONE)
    u = c.usage
    assert u is None or all(v is None or 0 <= v < 2**53 for v in
                            (u.prompt_tokens, u.completion_tokens, u.total_tokens))


def test_wrong_types_in_a_non_streamed_body_fail_the_row_permanently() -> None:
    doc = {"id": 1, "model": 2, "choices": [{"message": {"content": "A."},
                                              "finish_reason": 3}]}
    with pytest.raises(RowFailed) as e:
        OpenAIChat().from_json(doc)
    assert e.value.error_class == "bad_response"
    with pytest.raises(RowFailed):
        AnthropicMessages().from_json({"type": "message", "content": "text?",
                                       "stop_reason": "end_turn"})


# ---------------------------------------------------------------- text is valid UTF-8


def test_an_emoji_split_into_two_json_escapes_across_chunks_is_joined() -> None:
    head = b'data: {"id":"a","choices":[{"index":0,"delta":{"content":"Rocket \\ud83d"}}]}\n\n'
    tail = b'data: {"id":"a","choices":[{"index":0,"delta":{"content":"\\ude80!"},' \
           b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    c = fold_raw(head[:37], head[37:] + tail[:20], tail[20:])
    assert c.text == "Rocket \U0001f680!" and "invalid_text" not in c.quirks
    c.text.encode("utf-8")


def test_a_lone_surrogate_is_replaced_and_counted() -> None:
    c = fold_raw(b'data: {"choices":[{"delta":{"content":"A \\udc80 kayak."},'
                 b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    assert c.text == "A \ufffd kayak." and c.quirks["invalid_text"] == 1
