"""Folding chat.completion.chunk events into one completion (docs/protocol.md §2, §8, §10)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.errors import Retryable, RowFailed, RunFatal
from pipeline.records import Completion
from pipeline.wire.adapters.openai_chat import ChatStreamState, OpenAIChat
from pipeline.wire.sse import Event


def chunk(content: str | None = None, finish: str | None = None, index: int = 0,
          rid: str = "c1", **extra: Any) -> Event:
    delta = {} if content is None else {"content": content}
    doc = {"id": rid, "object": "chat.completion.chunk", "model": "m-snap",
           "choices": [{"index": index, "delta": delta, "finish_reason": finish}], **extra}
    return Event("message", json.dumps(doc))


def usage_chunk(p: int, c: int, choices: list[Any] | None = None) -> Event:
    return Event("message", json.dumps({"id": "c1", "choices": choices or [],
                                        "usage": {"prompt_tokens": p, "completion_tokens": c,
                                                  "total_tokens": p + c}}))


DONE = Event("message", "[DONE]")


def fold(events: list[Event]) -> Completion:
    s = ChatStreamState()
    for i, e in enumerate(events):
        if s.on_event(e, float(i)):
            break
    return s.finish()


def test_baseline_caption_finish_usage_terminal() -> None:
    c = fold([chunk(""), chunk("A quiet"), chunk(" harbour"), chunk(" at dusk."),
              chunk(finish="stop"), usage_chunk(1200, 7), DONE])
    assert (c.text, c.finish_reason, c.terminal) == ("A quiet harbour at dusk.", "stop", "done")
    assert c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens) == (1200, 7)
    assert c.model == "m-snap" and c.response_id == "c1"


def test_azure_filter_chunk_with_empty_choices_is_skipped() -> None:
    azure = Event("message", '{"id":"","object":"","created":0,"model":"","choices":[],'
                             '"prompt_filter_results":[]}')
    assert fold([azure, chunk("Hi."), chunk(finish="stop"), DONE]).text == "Hi."


def test_usage_in_the_finish_chunk_is_taken() -> None:
    c = fold([chunk("Sky", None), Event("message", json.dumps(
        {"choices": [{"index": 0, "delta": {"content": " overhead."}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 1090, "completion_tokens": 12, "total_tokens": 1102}})),
        DONE])
    assert c.text == "Sky overhead." and c.usage and c.usage.prompt_tokens == 1090


def test_cumulative_usage_keeps_the_last_not_the_sum() -> None:
    events = [chunk("w", usage={"prompt_tokens": 900, "completion_tokens": i,
                                "total_tokens": 900 + i}) for i in (1, 2, 3)]
    c = fold([*events, chunk(finish="stop", usage={"prompt_tokens": 900, "completion_tokens": 4,
                                                   "total_tokens": 904}),
              chunk(usage=None), DONE])
    assert c.usage and (c.usage.prompt_tokens, c.usage.completion_tokens) == (900, 4)


def test_usage_chunk_with_choices_does_not_duplicate_text() -> None:
    c = fold([chunk("One."), chunk(finish="stop"),
              usage_chunk(5, 2, [{"index": 0, "delta": {}, "finish_reason": "stop"}]), DONE])
    assert c.text == "One." and c.quirks == {"duplicate_finish": 1}


def test_empty_finish_reason_after_the_real_one_does_not_overwrite_it() -> None:
    c = fold([chunk("", ""), chunk("Cat.", ""), chunk("", "stop"), chunk("", ""), DONE])
    assert (c.finish_reason, c.usage) == ("stop", None)


def test_text_on_choice_index_1_folds_into_the_caption_and_reasoning_stays_out() -> None:
    reasoning = Event("message", json.dumps({"id": "c1", "choices": [
        {"index": 0, "delta": {"reasoning_content": "The photo shows"}, "finish_reason": None}]}))
    c = fold([reasoning, chunk("A red kayak.", index=1), chunk(finish="stop"), DONE])
    assert c.text == "A red kayak." and c.quirks == {"nonzero_index": 1}


@pytest.mark.parametrize(("raw", "norm"), [("max_tokens", "length"), ("end_turn", "stop"),
                                           ("length", "length"), ("weird", "other")])
def test_finish_reasons_are_normalised_and_raw_kept(raw: str, norm: str) -> None:
    c = fold([chunk("x"), chunk(finish=raw), DONE])
    assert (c.finish_reason, c.finish_reason_raw) == (norm, raw)


@pytest.mark.parametrize("raw", ["content_filter", "refusal"])
def test_refusal_is_a_permanent_row_failure(raw: str) -> None:
    with pytest.raises(RowFailed) as e:
        fold([chunk("x"), chunk(finish=raw), DONE])
    assert e.value.error_class == "refused"


def test_error_object_mid_stream_is_retryable() -> None:
    err = Event("message", '{"error":{"message":"CUDA out of memory",'
                           '"type":"InternalServerError","param":null,"code":500}}')
    with pytest.raises(Retryable, match="CUDA out of memory"):
        fold([chunk("partial"), err, DONE])


def test_openrouter_error_chunk_is_retryable() -> None:
    err = Event("message", json.dumps({"id": "gen-1", "error": {
        "code": "server_error", "message": "Provider disconnected unexpectedly"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}))
    with pytest.raises(Retryable, match="Provider disconnected"):
        fold([chunk("partial"), err])


def test_bare_json_error_line_is_retryable_with_its_message() -> None:
    raw = Event("raw", '{"error":{"message":"upstream error (request id: 1)",'
                       '"type":"new_api_error","code":"stream_response_error"}}')
    with pytest.raises(Retryable, match="upstream error"):
        fold([chunk("partial"), raw])


def test_done_without_finish_reason_is_an_incomplete_stream() -> None:
    with pytest.raises(Retryable, match="without finish_reason") as e:
        fold([chunk("partial"), DONE])
    assert e.value.error_class == "stream_broken"


def test_eof_after_finish_without_done_is_complete() -> None:
    assert fold([chunk("Ok."), chunk(finish="stop")]).terminal == "eof_after_finish"


def test_empty_caption_after_clean_finish_is_a_row_failure() -> None:
    with pytest.raises(RowFailed) as e:
        fold([chunk(""), chunk(finish="stop"), usage_chunk(10, 1), DONE])
    assert e.value.error_class == "empty"


def test_invalid_json_chunk_is_retryable() -> None:
    with pytest.raises(Retryable) as e:
        fold([chunk("x"), Event("message", "{not json")])
    assert e.value.error_class == "stream_broken"


def test_gateway_replay_with_a_new_id_is_never_concatenated() -> None:
    with pytest.raises(Retryable, match="replay"):
        fold([chunk("", rid="msg_A"), chunk("partial", rid="msg_A"),
              chunk("", rid="msg_B"), chunk("Complete.", rid="msg_B"), chunk(finish="stop"),
              DONE])


def test_non_streamed_completion_body_is_accepted() -> None:
    doc = {"id": "x", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "A tabby cat on a sill."},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 6}}
    c = OpenAIChat().from_json(doc)
    assert c.text == "A tabby cat on a sill." and c.usage and c.usage.total_tokens == 9


def test_json_model_not_found_body_is_fatal() -> None:
    with pytest.raises(RunFatal):
        OpenAIChat().from_json({"error": {"message": "model not found",
                                          "type": "invalid_request_error",
                                          "code": "model_not_found"}})
