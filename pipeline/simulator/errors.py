"""The simulator's error answers, described once (`ApiError`) and rendered by either
dialect (`simulator.wire`): simulated faults, the 429s of its rate limits, and how
`--retry-after` changes what they say about waiting.

It deliberately imports nothing from the client: see `simulator.app`.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from .limits import Refusal, retry_after_text

if TYPE_CHECKING:
    from .app import SimConfig

__all__ = ["ApiError", "fault_error", "rate_limit_error", "retry_after_header",
           "with_retry_after"]


class ApiError(Exception):
    """An HTTP error answer, described once and rendered in either protocol's shape."""

    def __init__(
        self, status: int, message: str, openai_type: str, anthropic_type: str,
        code: str | None = None, param: str | None = None,
        retry_after: float | str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.openai_type, self.anthropic_type = openai_type, anthropic_type
        self.retry_after = retry_after  # seconds, or a literal header value (`--retry-after`)


def _advice(seconds: float, advise: bool) -> str:
    """OpenAI's free-text hint, which clients read when no header says how long."""
    return f" Please try again in {retry_after_text(seconds)}s." if advise else ""


def fault_error(fault: str, advise: bool = True) -> ApiError:
    """An injected fault; `advise=False` leaves out every hint of how long to wait."""
    wait = 1.0 if advise else None
    if fault in ("429", "storm"):
        what = "simulated fault" if fault == "429" else "simulated 429 storm"
        message = f"Rate limit reached for requests ({what}).{_advice(1.0, advise)}"
        code = "rate_limit_exceeded"
        return ApiError(429, message, "requests", "rate_limit_error", code, retry_after=wait)
    if fault == "503":
        message = "The server is overloaded or not ready yet."
        return ApiError(503, message, "server_error", "api_error", retry_after=wait)
    if fault == "529":
        return ApiError(529, "Overloaded", "overloaded_error", "overloaded_error")
    message = "The server had an error while processing your request. Sorry about that!"
    return ApiError(500, message, "server_error", "api_error")


def rate_limit_error(refusal: Refusal, model: str, advise: bool = True) -> ApiError:
    """The 429 for a refusal; `advise=False` leaves out Retry-After and the hint."""
    wait = refusal.retry_after if advise else None
    if refusal.kind == "concurrency":
        message = "Number of concurrent requests has exceeded your rate limit."
        return ApiError(429, message, "requests", "rate_limit_error", "rate_limit_exceeded",
                        retry_after=wait)  # fmt: skip
    unit = "requests per min (RPM)" if refusal.kind == "requests" else "tokens per min (TPM)"
    counts = f"Limit {refusal.limit}, Requested {refusal.requested}."
    # No wait: a correct client never retries this (docs/protocol.md §5.2, §6.1).
    if refusal.retry_after is None:
        message = f"Request too large for {model} on {unit}: {counts}"
        return ApiError(429, message, "tokens", "rate_limit_error", "rate_limit_exceeded")
    hint = _advice(refusal.retry_after, advise)
    message = f"Rate limit reached for {unit} on {model}: {counts}{hint}"
    return ApiError(
        429, message, refusal.kind, "rate_limit_error", "rate_limit_exceeded", retry_after=wait,
    )  # fmt: skip


def retry_after_header(value: float | str, whole_seconds: bool = False) -> str:
    """A literal value goes out as given; seconds as the dialect writes them."""
    if isinstance(value, str):
        return value
    return str(max(1, math.ceil(value))) if whole_seconds else retry_after_text(value)


def with_retry_after(err: ApiError, config: SimConfig) -> ApiError:
    """Apply `--retry-after`: the limiter's own value, none at all, or a literal."""
    if err.status not in (429, 503, 529) or config.retry_after == "auto":
        return err
    if err.status == 429 and err.openai_type == "tokens" and err.retry_after is None:
        return err  # "request too large": no wait ever helps, so none is advertised
    plain = re.sub(r" Please try again in [^ ]*s\.", "", err.message)  # the hint goes too
    value = None if config.retry_after == "none" else config.retry_after
    return ApiError(err.status, plain, err.openai_type, err.anthropic_type, err.code,
                    err.param, retry_after=value)  # fmt: skip
