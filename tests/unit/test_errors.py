"""Specification of pipeline/errors.py: what each failure signal means for the run.

The classification table is docs/protocol.md §6 (and the conformance cases
C28-C35, C40 of §10). Every test feeds one (status, headers, body) the way a real
server or gateway sends it and checks the consequence class, the ``error_class`` and
the details the worker relies on (``retry_after``, ``http_status``, a readable message).
Headers are given lower-cased, as ``Transport`` hands them over.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from pipeline.errors import (
    PipelineError,
    Retryable,
    RowFailed,
    RunFatal,
    classify_http,
    classify_stream_error,
    parse_duration,
    parse_retry_after,
)

NOW = datetime(2026, 9, 27, 12, 30, 0, tzinfo=UTC).timestamp()


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def openai_error(message: str, type_: str = "invalid_request_error",
                 code: str | None = None) -> bytes:
    return body({"error": {"message": message, "type": type_, "param": None, "code": code}})


def anthropic_error(type_: str, message: str, **extra: Any) -> bytes:
    err: dict[str, Any] = {"type": type_, "message": message, **extra}
    return body({"type": "error", "error": err, "request_id": "req_011Cap"})


RATE_LIMIT = openai_error(
    "Rate limit reached for gpt-4o-mini in organization org-x on tokens per min (TPM): "
    "Limit 200000, Used 195869, Requested 4412. Please try again in 84ms.",
    "tokens", "rate_limit_exceeded")


# --------------------------------------------------------------------------- run-fatal


@pytest.mark.parametrize("status, doc, error_class", [
    (401, anthropic_error("authentication_error", "invalid x-api-key"), "auth"),
    (401, openai_error("Incorrect API key provided: sk-ab***cd.", code="invalid_api_key"), "auth"),
    (403, anthropic_error("permission_error", "Your API key does not have permission"), "auth"),
    (404, anthropic_error("not_found_error", "model: claude-9"), "not_found"),
    (404, openai_error("The model `gpt-9` does not exist", code="model_not_found"), "not_found"),
])
def test_auth_permission_and_not_found_stop_the_run(status: int, doc: bytes,
                                                     error_class: str) -> None:
    e = classify_http(status, {}, doc)
    assert isinstance(e, RunFatal)
    assert e.error_class == error_class
    assert e.http_status == status
    assert e.exit_code == 3


def test_404_with_empty_body_still_stops_the_run() -> None:
    e = classify_http(404, {}, b"")
    assert isinstance(e, RunFatal) and e.error_class == "not_found"


def test_429_insufficient_quota_stops_the_run_as_quota() -> None:
    doc = openai_error("You exceeded your current quota, please check your plan and billing "
                       "details.", "insufficient_quota", "insufficient_quota")
    e = classify_http(429, {}, doc)
    assert isinstance(e, RunFatal)
    assert e.error_class == "quota"
    assert "exceeded your current quota" in e.message


def test_429_anthropic_spend_cap_stops_the_run_as_quota() -> None:
    doc = anthropic_error("rate_limit_error", "Spend limit reached for this workspace.",
                          details={"error_code": "enforced_spend_limit_reached"})
    e = classify_http(429, {}, doc)
    assert isinstance(e, RunFatal)
    assert e.error_class == "quota"


@pytest.mark.parametrize("doc", [
    anthropic_error("billing_error", "Your credit balance is too low"),
    body({"error": {"code": 402, "message": "Insufficient credits", "metadata": {}}}),
])
def test_402_billing_stops_the_run_as_quota(doc: bytes) -> None:
    e = classify_http(402, {}, doc)
    assert isinstance(e, RunFatal) and e.error_class == "quota"


def test_run_fatal_message_names_the_status_and_server_message() -> None:
    e = classify_http(401, {}, anthropic_error("authentication_error", "invalid x-api-key"))
    assert "401" in e.message and "invalid x-api-key" in e.message


# --------------------------------------------------------------------------- per-row


def test_429_request_too_large_fails_only_the_row_as_too_large() -> None:
    doc = openai_error("Request too large for gpt-4o in organization org-x on tokens per min "
                       "(TPM): Limit 30000, Requested 34307. The input or output tokens must "
                       "be reduced in order to run successfully.", "tokens",
                       "rate_limit_exceeded")
    e = classify_http(429, {"retry-after": "1"}, doc)
    assert isinstance(e, RowFailed)
    assert e.error_class == "too_large"
    assert e.http_status == 429


def test_413_fails_only_the_row_as_too_large() -> None:
    e = classify_http(413, {}, anthropic_error("request_too_large", "Request exceeds the "
                                                                    "maximum size"))
    assert isinstance(e, RowFailed) and e.error_class == "too_large"


@pytest.mark.parametrize("message", [
    "messages.0.content.1.image.source.base64: image exceeds 5 MB maximum: "
    "5327908 bytes > 5242880 bytes",
    "messages.7.content.2.image.source.base64.data: At least one of the image dimensions "
    "exceed max allowed size: 8000 pixels",
    "Could not process image",
    "messages.0.content.0.image.source.base64: Image does not match the provided media "
    "type image/png",
    "Invalid base64 data",
    "image cannot be empty",
    "Invalid image.",
    "You uploaded an unsupported image. Please make sure your image has of one the following "
    "formats: ['png', 'jpeg', 'gif', 'webp'].",
    "Total image size is 50.56MB, which exceeds the allowed limit of 50MB.",
])
def test_400_image_messages_fail_the_row_as_bad_image(message: str) -> None:
    e = classify_http(400, {}, openai_error(message))
    assert isinstance(e, RowFailed)
    assert e.error_class == "bad_image"
    assert message[:40] in e.message


def test_400_other_invalid_request_fails_the_row_as_bad_request() -> None:
    e = classify_http(400, {}, openai_error("Unrecognized request argument supplied: foo"))
    assert isinstance(e, RowFailed) and e.error_class == "bad_request"
    assert e.http_status == 400


def test_openrouter_403_moderation_flag_fails_only_the_row() -> None:
    doc = body({"error": {"code": 403, "message": "Your chosen model requires moderation and "
                          "your input was flagged for \"violence\"",
                          "metadata": {"reasons": ["violence"], "flagged_input": "...",
                                       "provider_name": "OpenAI", "model_slug": "openai/gpt-4o"}}})
    e = classify_http(403, {}, doc)
    assert isinstance(e, RowFailed)


def test_422_fails_only_the_row() -> None:
    e = classify_http(422, {}, body({"detail": "Unprocessable"}))
    assert isinstance(e, RowFailed)


def test_x_should_retry_false_makes_a_server_error_permanent_for_the_row() -> None:
    e = classify_http(500, {"x-should-retry": "false"},
                      anthropic_error("api_error", "Internal server error"))
    assert isinstance(e, RowFailed)


def test_x_should_retry_false_on_an_image_400_is_bad_image() -> None:
    doc = anthropic_error("invalid_request_error", "messages.0.content.0.image.source.base64: "
                                                   "image exceeds 5 MB maximum: 5527911 bytes")
    e = classify_http(400, {"x-should-retry": "false"}, doc)
    assert isinstance(e, RowFailed) and e.error_class == "bad_image"


def test_x_should_retry_false_does_not_hide_a_quota_stop() -> None:
    doc = openai_error("You exceeded your current quota", "insufficient_quota",
                       "insufficient_quota")
    assert isinstance(classify_http(429, {"x-should-retry": "false"}, doc), RunFatal)


def test_new_api_500_convert_request_failed_fails_the_row_as_bad_image() -> None:
    doc = body({"error": {"message": "get file base64 from url failed (request id: 2025x)",
                          "type": "new_api_error", "param": "",
                          "code": "convert_request_failed"}})
    e = classify_http(500, {}, doc)
    assert isinstance(e, RowFailed)
    assert e.error_class == "bad_image"
    assert e.http_status == 500


def test_litellm_500_unable_to_fetch_image_fails_the_row_as_bad_image() -> None:
    doc = openai_error("litellm.APIConnectionError: Unable to fetch image from "
                       "http://x/y.png", "internal_server_error")
    e = classify_http(500, {}, doc)
    assert isinstance(e, RowFailed) and e.error_class == "bad_image"


def test_gemini_array_body_message_is_taken_from_first_element_error() -> None:
    doc = body([{"error": {"code": 400, "message": 'Invalid JSON payload received. Unknown '
                                                   'name "foo"', "status": "INVALID_ARGUMENT"}}])
    e = classify_http(400, {}, doc)
    assert isinstance(e, RowFailed)
    assert 'Invalid JSON payload received. Unknown name "foo"' in e.message
    assert "[{" not in e.message  # the message, not the raw array


def test_gemini_array_body_with_image_message_is_bad_image() -> None:
    doc = body([{"error": {"code": 400, "message": "Unable to process input image.",
                           "status": "INVALID_ARGUMENT"}}])
    assert classify_http(400, {}, doc).error_class == "bad_image"


# --------------------------------------------------------------------------- retryable


def test_429_with_retry_after_is_retryable_rate_limit_with_that_wait() -> None:
    e = classify_http(429, {"retry-after": "7"},
                      anthropic_error("rate_limit_error", "Number of requests has exceeded "
                                                          "your per-minute rate limit."))
    assert isinstance(e, Retryable)
    assert e.error_class == "rate_limit"
    assert e.retry_after == 7.0
    assert e.http_status == 429


def test_429_without_headers_takes_the_wait_from_the_message_hint() -> None:
    e = classify_http(429, {}, RATE_LIMIT)  # "... Please try again in 84ms."
    assert isinstance(e, Retryable)
    assert e.error_class == "rate_limit"
    assert e.retry_after == pytest.approx(0.084)


def test_429_with_no_hint_at_all_has_no_server_wait() -> None:
    e = classify_http(429, {}, body({"error": {"message": "slow down", "type": "requests"}}))
    assert isinstance(e, Retryable) and e.retry_after is None


def test_429_retry_after_http_date_is_measured_from_injected_now() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 3, UTC), usegmt=True)
    e = classify_http(429, {"retry-after": when}, RATE_LIMIT, now=NOW)
    assert e.retry_after == pytest.approx(3.0)


def test_one_api_saturated_429_in_chinese_is_retryable_rate_limit() -> None:
    doc = body({"error": {"message": "当前分组上游负载已饱和，请稍后再试 (request id: x)",
                          "type": "upstream_error", "param": "429", "code": None}})
    e = classify_http(429, {}, doc)
    assert isinstance(e, Retryable) and e.error_class == "rate_limit"


def test_429_with_only_openai_reset_header_waits_that_duration() -> None:
    e = classify_http(429, {"x-ratelimit-remaining-tokens": "0",
                            "x-ratelimit-reset-tokens": "1m0.5s"}, RATE_LIMIT)
    assert e.retry_after == pytest.approx(60.5)


def test_429_with_only_anthropic_reset_header_waits_until_that_time() -> None:
    at = datetime.fromtimestamp(NOW + 2, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    e = classify_http(429, {"anthropic-ratelimit-tokens-remaining": "0",
                            "anthropic-ratelimit-tokens-reset": at},
                      anthropic_error("rate_limit_error", "tokens per minute exceeded"),
                      now=NOW)
    assert e.retry_after == pytest.approx(2.0)


def test_529_is_retryable_overloaded() -> None:
    e = classify_http(529, {}, anthropic_error("overloaded_error", "Overloaded"))
    assert isinstance(e, Retryable)
    assert e.error_class == "overloaded"


@pytest.mark.parametrize("status, error_class", [
    (408, "timeout"), (409, "server"), (500, "server"), (502, "server"), (503, "server"),
    (504, "timeout"), (524, "timeout"),
])
def test_transient_statuses_are_retryable(status: int, error_class: str) -> None:
    e = classify_http(status, {}, b'{"error":{"message":"try later"}}')
    assert isinstance(e, Retryable)
    assert e.error_class == error_class


def test_unlisted_5xx_is_retryable_server() -> None:
    e = classify_http(599, {}, b"")
    assert isinstance(e, Retryable) and e.error_class == "server"


def test_503_retry_after_is_carried_on_the_retryable() -> None:
    e = classify_http(503, {"retry-after": "1"}, b"busy")
    assert isinstance(e, Retryable) and e.retry_after == 1.0


CLOUDFLARE_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>503 Service Unavailable</title></head>\n"
    b"<body><center><h1>503 Service Temporarily Unavailable</h1></center>\n<hr>"
    + b"<p>Please retry your request in a few moments.</p>\n" * 200
    + b"<center>cloudflare</center></body></html>\n")


def test_503_html_body_becomes_short_excerpt_without_tags() -> None:
    e = classify_http(503, {}, CLOUDFLARE_PAGE)
    assert isinstance(e, Retryable)
    assert "503 Service Temporarily Unavailable" in e.message
    assert "<" not in e.message and ">" not in e.message
    assert "\n" not in e.message
    assert len(e.message) <= 320  # "HTTP 503: " + a 300-character excerpt


def test_empty_error_body_gives_a_readable_placeholder() -> None:
    e = classify_http(502, {}, b"")
    assert e.message == "HTTP 502: (empty body)"


def test_x_should_retry_true_makes_a_400_retryable() -> None:
    e = classify_http(400, {"x-should-retry": "true"}, openai_error("temporarily unavailable"))
    assert isinstance(e, Retryable)


def test_every_classification_is_a_pipeline_error() -> None:
    for status in (400, 401, 403, 404, 408, 413, 422, 429, 500, 529):
        assert isinstance(classify_http(status, {}, b"{}"), PipelineError)


# --------------------------------------------------------------------------- in-stream


def test_stream_overloaded_error_event_is_retryable_overloaded() -> None:
    e = classify_stream_error({"type": "error",
                               "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert isinstance(e, Retryable)
    assert e.error_class == "overloaded"
    assert e.http_status == 200


@pytest.mark.parametrize("doc", [
    {"error": {"message": "The server had an error while processing your request.",
               "type": "server_error", "param": None, "code": None}},
    {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}},
    {"id": "gen-7", "error": {"code": "server_error",
                              "message": "Provider disconnected unexpectedly"},
     "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]},
])
def test_stream_server_errors_are_retryable_stream_error(doc: dict[str, Any]) -> None:
    e = classify_stream_error(doc)
    assert isinstance(e, Retryable)
    assert e.error_class == "stream_error"


def test_stream_invalid_request_error_fails_the_row() -> None:
    e = classify_stream_error({"error": {"type": "invalid_request_error",
                                         "message": "max_tokens too large"}})
    assert isinstance(e, RowFailed) and e.error_class == "bad_request"


def test_stream_vllm_error_with_integer_400_code_fails_the_row() -> None:
    e = classify_stream_error({"error": {"message": "prompt too long", "type": "BadRequestError",
                                         "param": None, "code": 400}})
    assert isinstance(e, RowFailed)


def test_stream_invalid_request_about_an_image_is_bad_image() -> None:
    e = classify_stream_error({"error": {"type": "invalid_request_error",
                                         "message": "Could not process image"}})
    assert isinstance(e, RowFailed) and e.error_class == "bad_image"


@pytest.mark.parametrize("doc, error_class", [
    ({"error": {"type": "authentication_error", "message": "bad key"}}, "auth"),
    ({"error": {"code": "invalid_api_key", "message": "Incorrect API key"}}, "auth"),
    ({"error": {"code": 401, "message": "No auth credentials found"}}, "auth"),
    ({"error": {"code": "model_not_found", "message": "no such model"}}, "not_found"),
    ({"error": {"type": "insufficient_quota", "code": "insufficient_quota",
                "message": "You exceeded your current quota"}}, "quota"),
])
def test_stream_account_errors_stop_the_run(doc: dict[str, Any], error_class: str) -> None:
    e = classify_stream_error(doc)
    assert isinstance(e, RunFatal)
    assert e.error_class == error_class


def test_stream_error_message_is_the_server_message() -> None:
    e = classify_stream_error({"error": {"type": "server_error", "message": "boom at step 3"}})
    assert "boom at step 3" in e.message


# --------------------------------------------------------------------------- Retry-After


def test_retry_after_integer_seconds() -> None:
    assert parse_retry_after({"retry-after": "7"}) == 7.0


def test_retry_after_float_seconds() -> None:
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5


def test_retry_after_zero_means_no_wait() -> None:
    assert parse_retry_after({"retry-after": "0"}) == 0.0


def test_retry_after_http_date_is_delay_from_injected_now() -> None:
    assert parse_retry_after({"retry-after": "Sun, 27 Sep 2026 12:30:30 GMT"},
                             now=NOW) == pytest.approx(30.0)


def test_retry_after_http_date_in_the_past_is_zero_not_negative() -> None:
    assert parse_retry_after({"retry-after": "Sun, 27 Sep 2026 12:29:00 GMT"}, now=NOW) == 0.0


@pytest.fixture
def new_york_local_time() -> Iterator[None]:
    """Run with a local zone 4 h behind UTC (in September), then restore the zone."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_retry_after_rfc850_date_is_accepted(new_york_local_time: None) -> None:
    assert parse_retry_after({"retry-after": "Sunday, 27-Sep-26 12:30:30 GMT"},
                             now=NOW) == pytest.approx(30.0)


def test_retry_after_asctime_date_is_gmt_whatever_the_local_zone(
        new_york_local_time: None) -> None:
    assert parse_retry_after({"retry-after": "Sun Sep 27 12:30:30 2026"},
                             now=NOW) == pytest.approx(30.0)


def test_retry_after_ms_is_milliseconds() -> None:
    assert parse_retry_after({"retry-after-ms": "1500"}) == pytest.approx(1.5)


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == pytest.approx(0.25)


def test_unparsable_retry_after_ms_falls_back_to_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "soon", "retry-after": "4"}) == 4.0


def test_no_retry_after_headers_is_none() -> None:
    assert parse_retry_after({"content-type": "application/json"}) is None


def test_garbage_retry_after_is_none() -> None:
    assert parse_retry_after({"retry-after": "whenever"}) is None


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize("value, seconds", [
    ("6m0s", 360.0),
    ("1m30.5s", 90.5),
    ("20ms", 0.02),
    ("1s", 1.0),
    ("0s", 0.0),
    ("1.146s", 1.146),
    ("1h", 3600.0),
    ("1m0.5s", 60.5),
    ("500us", 0.0005),
])
def test_go_durations(value: str, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


def test_plain_float_seconds_duration() -> None:
    assert parse_duration("33011.382867") == pytest.approx(33011.382867)


def test_epoch_seconds_are_a_delay_from_injected_now() -> None:
    assert parse_duration("1722556800", now=1722556700.0) == pytest.approx(100.0)


def test_epoch_milliseconds_are_a_delay_from_injected_now() -> None:
    assert parse_duration("1722556800000", now=1722556790.0) == pytest.approx(10.0)


def test_epoch_in_the_past_is_zero() -> None:
    assert parse_duration("1722556800", now=1722556900.0) == 0.0


def test_rfc3339_reset_is_a_delay_from_injected_now() -> None:
    assert parse_duration("2026-09-27T12:30:07Z", now=NOW) == pytest.approx(7.0)


def test_rfc3339_with_offset_and_fraction() -> None:
    assert parse_duration("2026-09-27T14:30:02.5+02:00", now=NOW) == pytest.approx(2.5)


@pytest.mark.parametrize("value", ["", "   ", "soon", "6m0", "m5s"])
def test_unparsable_durations_are_none(value: str) -> None:
    assert parse_duration(value, now=NOW) is None


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_retry_after_that_is_not_a_finite_number_is_no_wait_at_all(value: str) -> None:
    assert parse_retry_after({"retry-after": value}) is None
    assert parse_retry_after({"retry-after-ms": value}) is None


def test_negative_retry_after_is_zero_which_the_retry_policy_treats_as_no_guidance() -> None:
    assert parse_retry_after({"retry-after": "-5"}) == 0.0
