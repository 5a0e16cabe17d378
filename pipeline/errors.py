"""Every failure, grouped by its consequence, and the one place that classifies them.

    PipelineError
     ├── Retryable      transient: back off and send the row again
     │     (rate_limit, server, overloaded, timeout, connection, stream_broken, stream_error)
     ├── RowFailed      permanent for this row: record an error row, go on with the batch
     │     (bad_request, too_large, bad_image, bad_input, refused, empty, bad_response)
     └── RunFatal       every row would fail the same way: stop the run, mark no row
           (auth, not_found, quota, config, redirect, manifest, output, locked)

``classify_http`` (status + headers + body) and ``classify_stream_error`` (an error
object inside a 200 stream) decide the class; nothing else in the code base does.
Sources for each rule: docs/protocol.md §6 and §8.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .redact import redact

__all__ = [
    "PipelineError", "Retryable", "RowFailed", "RunFatal",
    "classify_http", "classify_stream_error", "parse_retry_after", "error_message",
    "bad_response", "output_error", "EXIT_OUTPUT", "TRANSIENT",
]

EXIT_OUTPUT = 6  # the output cannot be written (disk full, no descriptors, read-only)

# Error classes worth another try on the next run: a plain rerun sends these rows again,
# permanent classes stay until --retry-errors.
TRANSIENT = frozenset({"rate_limit", "server", "overloaded", "timeout", "connection",
                       "stream_broken", "stream_error",
                       # the batch lane: a request its batch never ran (docs/protocol.md §17)
                       "expired", "canceled",
                       # flex tier: no capacity now (docs/protocol.md §18), not a rate limit
                       "capacity",
                       # a chained prompt whose upstream had no caption (§20): after it
                       "upstream"})

_EXCERPT = 300


class PipelineError(Exception):
    """Base: ``error_class`` names the kind for the output column."""

    error_class = "error"

    def __init__(
        self,
        message: str,
        error_class: str | None = None,
        *,
        http_status: int | None = None,
        retry_after: float | None = None,
        endpoint: str | None = None,
        finish_reason_raw: str | None = None,
        usage: Any = None,
    ) -> None:
        # Redacted once, here: every error message (error column, stderr, run report)
        # is built through this constructor, whatever a server quoted back at us.
        message = redact(message)
        super().__init__(message)
        self.message = message
        if error_class is not None:
            self.error_class = error_class
        self.http_status = http_status
        self.retry_after = retry_after
        # Why the endpoint itself looks wrong (refused, dns, tls, http 404/405/501), for
        # the fail-fast rule of pipeline/endpoint.py; None for a row's own problem.
        self.endpoint = endpoint
        # A clean stream that still failed the row keeps how it ended and what it used.
        # Set here, never after: where and when the attempt ran is the worker's record
        # (run/worker.py ``_Tries``), not the error's.
        self.finish_reason_raw = finish_reason_raw
        self.usage = usage


class Retryable(PipelineError):
    error_class = "server"


class RowFailed(PipelineError):
    error_class = "bad_request"


class RunFatal(PipelineError):
    error_class = "fatal"
    exit_code = 3

    def __init__(self, message: str, error_class: str | None = None, *,
                 exit_code: int = 3, http_status: int | None = None) -> None:
        super().__init__(message, error_class, http_status=http_status)
        self.exit_code = exit_code


def bad_response(what: str) -> RowFailed:
    """A value of a type no protocol allows (``finish_reason: 7``): permanent for the row,
    so a plain rerun does not pay for the same broken answer again."""
    return RowFailed(f"unusable response from the server: {what}", "bad_response",
                     http_status=200)


def output_error(e: OSError, path: object) -> RunFatal:
    """A failed write to OUT: the run stops (exit 6) with one line naming path and error."""
    reason = f"[Errno {e.errno}] {os.strerror(e.errno)}" if e.errno else str(e)
    return RunFatal(f"output cannot be written: {path}: {reason}", "output",
                    exit_code=EXIT_OUTPUT)


# OpenAI's flex tier answers "429 Resource Unavailable" when it has no capacity.
_CAPACITY = re.compile(r"resource unavailable", re.I)
_RETRY_STATUS = {408: "timeout", 409: "server", 425: "server", 429: "rate_limit",
                 500: "server", 502: "server", 503: "server", 504: "timeout",
                 520: "server", 521: "server", 522: "timeout", 524: "timeout",
                 529: "overloaded"}
_IMAGE_WORDS = re.compile(r"image|media type|base64", re.I)
_MODERATION = re.compile(r"moderation|flagged", re.I)
_TRY_AGAIN = re.compile(r"try again in (\d+(?:\.\d+)?)(ms|s)\b", re.I)
_RESET_HEADERS = [(f"x-ratelimit-remaining-{k}", f"x-ratelimit-reset-{k}")
                  for k in ("requests", "tokens")] + [
                 (f"anthropic-ratelimit-{k}-remaining", f"anthropic-ratelimit-{k}-reset")
                 for k in ("requests", "tokens", "input-tokens", "output-tokens")]
_TOO_LARGE = re.compile(r"request too large", re.I)
# Gemini answers a wrong key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID (§15.5).
_BAD_KEY = re.compile(r"API_KEY_INVALID|API key not valid", re.I)


def parse_body(body: bytes) -> Any:
    """The JSON of an error body, or None. Gemini wraps errors in a one-item list."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(doc, list) and doc and isinstance(doc[0], dict):
        doc = doc[0]
    return doc


def error_message(doc: Any, body: bytes = b"") -> str:
    """A short readable message from an error document or, failing that, the body."""
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("msg") or err.get("type") or err.get("code")
            if msg:
                return str(msg)[:_EXCERPT]
        elif isinstance(err, str) and err:
            return err[:_EXCERPT]
        if isinstance(doc.get("message"), str):
            return str(doc["message"])[:_EXCERPT]
    text = body.decode("utf-8", errors="replace")
    text = re.sub(r"<[^>]*>", " ", text)  # CDN HTML pages: keep the words only
    return " ".join(text.split())[:_EXCERPT] or "(empty body)"


def _error_fields(doc: Any) -> tuple[str, str, str]:
    """(type, code, details.error_code) of an error document, lower-cased."""
    err = doc.get("error", doc) if isinstance(doc, dict) else {}
    if not isinstance(err, dict):
        return "", "", ""
    details = err.get("details")
    if not isinstance(details, dict):
        details = {}
    return (str(err.get("type") or "").lower(), str(err.get("code") or "").lower(),
            str(details.get("error_code") or "").lower())


def classify_http(status: int, headers: Mapping[str, str], body: bytes,
                  now: float | None = None) -> PipelineError:
    """Map a non-success HTTP answer to the error that says what to do next."""
    doc = parse_body(body)
    msg = f"HTTP {status}: {error_message(doc, body)}"
    etype, code, detail = _error_fields(doc)
    retry_after = parse_retry_after(headers, now)
    if retry_after is None and status == 429:
        retry_after = _reset_hint(headers, now) or _message_hint(msg)
    kw: dict[str, Any] = {"http_status": status}
    if status == 403 and _MODERATION.search(msg):  # OpenRouter: this input was flagged
        return RowFailed(msg, "refused", **kw)
    if status in (401, 403) or etype in ("authentication_error", "permission_error") \
            or (status == 400 and _BAD_KEY.search(body.decode("utf-8", "replace"))):
        return RunFatal(f"authentication failed ({msg})", "auth", http_status=status)
    if status == 402 or etype == "billing_error":
        return RunFatal(f"billing problem ({msg})", "quota", http_status=status)
    if status == 404:
        return RunFatal(f"endpoint or model not found ({msg})", "not_found", http_status=status)
    if status in (405, 501):  # the URL answers, but not to POST: not an API endpoint
        return RowFailed(msg, "bad_request", http_status=status, endpoint=f"http {status}")
    if status == 429:
        if "insufficient_quota" in (etype, code) or detail == "enforced_spend_limit_reached":
            return RunFatal(f"quota exhausted ({msg})", "quota", http_status=status)
        if _TOO_LARGE.search(msg):
            return RowFailed(msg, "too_large", **kw)
        if "resource_unavailable" in (etype, code) or _CAPACITY.search(msg):
            return Retryable(msg, "capacity", retry_after=retry_after, **kw)
    should_retry = headers.get("x-should-retry", "").lower()
    if should_retry == "false":
        return RowFailed(msg, _row_class(status, msg), **kw)
    if code == "convert_request_failed" or "unable to fetch image" in msg.lower():
        return RowFailed(msg, "bad_image", **kw)  # a gateway's image failure disguised as 5xx
    if status in _RETRY_STATUS or status >= 500 or should_retry == "true":
        return Retryable(msg, _RETRY_STATUS.get(status, "server"),
                         retry_after=retry_after, **kw)
    return RowFailed(msg, _row_class(status, msg), **kw)


def _reset_hint(headers: Mapping[str, str], now: float | None) -> float | None:
    """A 429 without Retry-After: wait for the reset of the exhausted bucket."""
    waits = []
    for remaining, reset in _RESET_HEADERS:
        if reset in headers and headers.get(remaining, "0").strip() in ("0", "0.0"):
            wait = parse_duration(headers[reset], now)
            if wait is not None:
                waits.append(wait)
    return max(waits) if waits else None


def _message_hint(msg: str) -> float | None:
    """OpenAI's "Please try again in 1.146s." when no header says how long."""
    m = _TRY_AGAIN.search(msg)
    if not m:
        return None
    return float(m.group(1)) / (1000 if m.group(2).lower() == "ms" else 1)


def _row_class(status: int, msg: str) -> str:
    if status == 413:
        return "too_large"
    if _IMAGE_WORDS.search(msg):
        return "bad_image"
    return "bad_request"


def classify_stream_error(doc: Any) -> PipelineError:
    """An error object that arrived inside a 200 stream."""
    msg = error_message(doc)
    etype, code, _ = _error_fields(doc)
    err = doc.get("error") if isinstance(doc, dict) else None
    num = err.get("code") if isinstance(err, dict) else None
    if etype in ("authentication_error", "permission_error") or num in (401, 403) \
            or code == "invalid_api_key":
        return RunFatal(f"authentication failed (stream error: {msg})", "auth")
    if code == "model_not_found" or num == 404:
        return RunFatal(f"endpoint or model not found ({msg})", "not_found")
    if code == "insufficient_quota" or etype == "insufficient_quota":
        return RunFatal(f"quota exhausted ({msg})", "quota")
    status = str(err.get("status") or "").lower() if isinstance(err, dict) else ""
    if num == 429 or status == "resource_exhausted" or code == "rate_limit_exceeded":
        return Retryable(f"stream error: {msg}", "rate_limit", http_status=200)
    if etype in ("invalid_request_error", "badrequesterror") or num in (400, 422) \
            or status == "invalid_argument" or code.startswith(("invalid_", "image_")):
        # Responses' response.failed codes name the row's own problem (invalid_prompt,
        # invalid_image_format, image_too_large, ...): docs/protocol.md §14.5.
        return RowFailed(f"stream error: {msg}", _row_class(400, msg), http_status=200)
    kind = "overloaded" if "overloaded" in etype else "stream_error"
    return Retryable(f"stream error: {msg}", kind, http_status=200)


_GO_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|us|µs|ns|h|m|s))+")
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str, now: float | None = None) -> float | None:
    """Seconds from a reset/retry value: Go duration, number, epoch, or date."""
    v = value.strip()
    if not v:
        return None
    if _GO_DURATION.fullmatch(v):
        return sum(float(n) * _UNIT[u] for n, u in _GO_PART.findall(v))
    now = time.time() if now is None else now
    try:
        num = float(v)
    except ValueError:
        num = None
    if num is not None and not math.isfinite(num):
        return None  # "inf", "nan": no duration at all
    if num is not None:
        if num >= 1e12:
            return max(0.0, num / 1000 - now)
        if num >= 1e9:
            return max(0.0, num - now)
        return max(0.0, num)
    try:
        when = email.utils.parsedate_to_datetime(v)
        if when.tzinfo is None:  # asctime dates carry no zone; HTTP dates are GMT
            when = when.replace(tzinfo=UTC)
        ts = when.timestamp()
    except (TypeError, ValueError, IndexError):
        try:
            ts = datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return max(0.0, ts - now)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Server-directed wait: ``retry-after-ms``, then ``retry-after`` (seconds or date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value)
    ra = headers.get("retry-after")
    if ra:
        return parse_duration(ra, now)
    return None
