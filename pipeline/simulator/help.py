"""The simulator's --help epilog: every way to make it fail on purpose.

Kept beside the simulator's code (and checked against its FAULT_MODES by a test), so
the help and the README list the same triggers as the server has.
"""

from __future__ import annotations

from .scripted import SCRIPT_HELP

__all__ = ["FAULT_HELP", "TRIGGERS", "triggers_help"]

# What each --fail-modes value does to a request it hits.
FAULT_HELP = {
    "429": "HTTP 429 rate_limit_exceeded with Retry-After",
    "500": "HTTP 500 server_error (JSON body)",
    "502html": "HTTP 502 with an nginx HTML page, not JSON",
    "503": "HTTP 503 service unavailable, with Retry-After",
    "529": "HTTP 529 overloaded_error",
    "truncate": "the connection closes in the middle of the stream",
    "error_event": "an error event inside a 200 stream",
    "stall": "the stream goes silent before it ends (until the client hangs up)",
    "bad_json": "a chunk that is not JSON",
    "done_no_finish": "the stream ends without a finish reason",
}
# Requests that fail without --fail-rate: what a client's error paths can be tried on.
TRIGGERS = (
    ("API key {invalid_key}", "HTTP 401 invalid_api_key (Gemini: HTTP 400 API_KEY_INVALID, "
                               "as the real API): the run's fatal-error path, exit 3"),
    ("an image Pillow cannot decode", "HTTP 400 'Invalid image.' (a bad_image row)"),
    ("a request body over 32 MiB", "HTTP 413 (the Messages API's request limit)"),
    ("--rpm / --tpm exceeded", "HTTP 429 with Retry-After and rate-limit headers; a request "
                               "larger than --tpm alone gets 429 'Request too large'"),
    ("max_tokens below the caption's length", "a truncated caption, finish_reason 'length'"),
    ("a missing model, bad JSON, or (Anthropic) no max_tokens", "HTTP 400"),
    ("a prompt containing [refuse]", "the model declines, each protocol its way (OpenAI "
                                     "delta.refusal, Anthropic stop_reason refusal, a "
                                     "Responses refusal part, Gemini finishReason SAFETY)"),
    ("a prompt containing [gap]", "a Responses stream skips one sequence_number"),
    ("a model name containing 'think'", "a thinking model: it reasons first (16 to 192 "
                                        "tokens by the effort or budget asked, 96 by "
                                        "default), spent from max_tokens"),
    ("a request that offers a function (tools)", "the answer is a call of it, its "
                                                 "arguments {\"caption\": ...} streamed in "
                                                 "pieces (Gemini: whole)"),
)


def triggers_help(fault_modes: tuple[str, ...], invalid_key: str) -> str:
    """The --help epilog: every way to make the simulator fail on purpose."""
    lines = ["triggers (no --fail-rate needed):"]
    lines += [f"  {what.format(invalid_key=invalid_key)}: {result}" for what, result in TRIGGERS]
    lines += [f"  {what}: {result}" for what, result in SCRIPT_HELP]
    lines.append("--fail-modes (each hit request, with probability --fail-rate):")
    lines += [f"  {mode}: {FAULT_HELP[mode]}" for mode in fault_modes]
    return "\n".join(lines)
