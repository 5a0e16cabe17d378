"""The redactor as a specification: what it removes from text, and where it is applied
(error messages, log records, printed lines, run reports)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from pipeline.errors import RowFailed, classify_http
from pipeline.redact import (
    RedactingFilter,
    RedactingStream,
    add_secret,
    redact,
    redact_obj,
)
from pipeline.store.sink import write_run_report

KEY = "sk-unit-redact-7f3a9c"  # registered once for this module; unique to it


@pytest.fixture(autouse=True)
def _registered() -> None:
    add_secret(KEY)


def test_a_registered_secret_is_removed_wherever_it_appears() -> None:
    assert redact(f"Incorrect API key provided: {KEY}.") == "Incorrect API key provided: ***."
    assert redact(f"{KEY}{KEY}") == "******"


def test_the_url_encoded_form_of_a_secret_is_removed_too() -> None:
    odd = "key/with+odd=chars&more"
    add_secret(odd)
    assert redact("echo: key%2Fwith%2Bodd%3Dchars%26more") == "echo: ***"


def test_values_too_short_to_be_secrets_are_not_registered() -> None:
    add_secret("abc")
    add_secret("")
    add_secret(None)
    assert redact("abc def") == "abc def"


@pytest.mark.parametrize("text, expected", [
    ("Authorization: Bearer tok-123456", "Authorization: Bearer ***"),
    ("authorization=Basic dXNlcjpwYXNz", "authorization=Basic ***"),
    ('{"x-api-key": "ant-secret-value"}', '{"x-api-key": "***"}'),
    ("{'api-key': 'azure-0123'}", "{'api-key': '***'}"),
    ("X-Goog-Api-Key: AIzaSyABC", "X-Goog-Api-Key: ***"),
    ("Proxy-Authorization: Basic Zm9vOmJhcg==", "Proxy-Authorization: Basic ***"),
])
def test_credential_header_values_quoted_in_text_are_removed(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "authentication failed (HTTP 401: bad key)",
    "the authorization server is down",
    "HTTP 400: messages.0.content.0.image: image exceeds 5 MB maximum",
    "http://127.0.0.1:8080/v1/chat/completions",
])
def test_ordinary_messages_are_left_alone(text: str) -> None:
    assert redact(text) == text


def test_url_passwords_are_removed_and_the_user_kept() -> None:
    assert redact("failed: http://alice:pa55@host.example:81/a.jpg") == \
        "failed: http://alice:***@host.example:81/a.jpg"
    assert redact("https://token-only@host/x") == "https://token-only@host/x"


@pytest.mark.parametrize("query", ["key=AIzaXYZ", "api_key=abc123", "access_token=t0k",
                                   "X-Amz-Signature=deadbeef"])
def test_credential_query_parameters_are_removed(query: str) -> None:
    name = query.split("=")[0]
    assert redact(f"GET https://h/p?size=2&{query}#f") == f"GET https://h/p?size=2&{name}=***#f"


def test_nested_structures_are_redacted_keys_and_values() -> None:
    doc = {"note": f"key {KEY}", "options": {"base_url": "https://u:pw@h/v1"},
           "top_errors": {f"HTTP 401: {KEY}": 3}, "n": 5, "list": [KEY, 1]}
    assert redact_obj(doc) == {"note": "key ***", "options": {"base_url": "https://u:***@h/v1"},
                               "top_errors": {"HTTP 401: ***": 3}, "n": 5, "list": ["***", 1]}


def test_every_pipeline_error_message_is_redacted_when_built() -> None:
    e = RowFailed(f"image download failed: http://u:pw@h/a.jpg with {KEY}", "bad_image")
    assert e.message == str(e) == "image download failed: http://u:***@h/a.jpg with ***"
    body = json.dumps({"error": {"message": f"Invalid key {KEY} for Authorization: Bearer "
                                            f"{KEY}"}}).encode()
    err = classify_http(401, {}, body)
    assert KEY not in err.message and "authentication failed" in err.message


def test_log_records_are_redacted_in_message_args_and_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("test_redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("sent %s to %s", KEY, "http://a:b@h/")
        try:
            raise ValueError(f"boom {KEY}")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert KEY not in out
    assert "sent *** to http://a:***@h/" in out and "ValueError: boom ***" in out


def test_a_redacting_stream_redacts_each_write() -> None:
    target = io.StringIO()
    stream = RedactingStream(target)
    print(f"error: authentication failed ({KEY})", file=stream)  # type: ignore[arg-type]
    assert target.getvalue() == "error: authentication failed (***)\n"


def test_run_reports_are_written_redacted(tmp_path: Path) -> None:
    path = write_run_report(tmp_path, "run1", {"note": f"HTTP 401: {KEY}",
                                               "options": {"out": tmp_path}})
    text = path.read_text()
    assert KEY not in text and json.loads(text)["note"] == "HTTP 401: ***"


def test_a_transport_registers_its_credentials_and_nothing_else() -> None:
    from pipeline.wire.transport import Transport

    Transport("http://127.0.0.1:1/v1", {"anthropic-version": "2031-01-01",
                                        "x-api-key": "sk-ant-transport-5521"}, 1, 1.0, 1.0)
    assert redact("key sk-ant-transport-5521, version 2031-01-01") == \
        "key ***, version 2031-01-01"


def test_a_malformed_log_call_is_left_to_logging_and_does_not_raise() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "%s and %s", ("one",), None)
    assert RedactingFilter().filter(record) is True
