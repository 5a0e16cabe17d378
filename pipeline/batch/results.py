"""One line of a batch's results → the outcome the online lane would have had.

A success body is folded by the protocol adapter's ``from_json`` (the same code that
reads a non-streamed online answer), so a batch row and an online row are built alike;
an error answer is classified by ``errors.classify_http`` (same classes, transient ones
pending again); a request the batch never ran is ``expired`` or ``canceled``
(transient). A line that is not a result of this entry is ignored: its row, if any,
stays pending. docs/protocol.md §17.3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import PipelineError, RowFailed, RunFatal, bad_response, classify_http
from ..records import Completion
from ..wire.adapters.base import Adapter

__all__ = ["Outcome", "parse_result"]

# Anthropic's error types → the HTTP status the online API sends with them.
_ANTHROPIC_STATUS = {"invalid_request_error": 400, "authentication_error": 401,
                     "permission_error": 403, "not_found_error": 404,
                     "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                     "overloaded_error": 529, "billing_error": 402, "timeout_error": 504}


@dataclass
class Outcome:
    custom_id: str
    completion: Completion | None = None
    error: PipelineError | None = None
    request_id: str | None = None
    http_status: int | None = None


def parse_result(api: str, raw: bytes, adapter: Adapter) -> Outcome | None:
    """None for a line that is not a JSON object with a custom_id."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("custom_id"), str):
        return None
    out = Outcome(doc["custom_id"])
    try:
        if api == "anthropic":
            _anthropic(doc, adapter, out)
        else:
            _openai(doc, adapter, out)
    except RunFatal as e:  # a 401 inside one result: that row's error, not the run's
        out.error = RowFailed(e.message, e.error_class, http_status=e.http_status)
    except PipelineError as e:
        out.error = e
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
        out.error = bad_response(f"unexpected batch result ({type(e).__name__}: {e})")
    return out


def _openai(doc: dict[str, Any], adapter: Adapter, out: Outcome) -> None:
    error, response = doc.get("error"), doc.get("response")
    if isinstance(error, dict) and not isinstance(response, dict):
        code = str(error.get("code") or "")
        message = str(error.get("message") or code)[:300]
        if code == "batch_expired":
            raise RowFailed(f"the batch expired before this request ran ({message})",
                            "expired")
        if code == "batch_cancelled":
            raise RowFailed(f"the batch was cancelled before this request ran ({message})",
                            "canceled")
        raise RowFailed(f"batch request failed: {code}: {message}", "bad_request")
    if not isinstance(response, dict):
        raise bad_response("a batch result with neither response nor error")
    status = response.get("status_code")
    out.request_id = response.get("request_id") if isinstance(
        response.get("request_id"), str) else None
    out.http_status = status if isinstance(status, int) else None
    body = response.get("body")
    if status == 200:
        out.completion = adapter.from_json(body)
        return
    raise classify_http(status if isinstance(status, int) else 500, {},
                        json.dumps(body).encode()[:65536])


def _anthropic(doc: dict[str, Any], adapter: Adapter, out: Outcome) -> None:
    result = doc.get("result")
    if not isinstance(result, dict):
        raise bad_response("a batch result without a result object")
    kind = result.get("type")
    if kind == "succeeded":
        out.http_status = 200
        out.completion = adapter.from_json(result.get("message"))
    elif kind == "errored":
        body = _obj(result.get("error"))
        inner = _obj(body.get("error")) or body
        status = _ANTHROPIC_STATUS.get(str(inner.get("type")), 500)
        out.http_status = status
        raise classify_http(status, {}, json.dumps(body).encode()[:65536])
    elif kind == "expired":
        raise RowFailed("the batch expired before this request ran", "expired")
    elif kind == "canceled":
        raise RowFailed("the batch was canceled before this request ran", "canceled")
    else:
        raise bad_response(f"a batch result of unknown type {str(kind)[:40]!r}")


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}
