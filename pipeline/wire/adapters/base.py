"""The seam between the pipeline and a wire protocol.

An adapter builds the request body for one row and folds the decoded SSE events of a
response into a ``Completion``. Adapters are pure: no HTTP, no files, so each can be
tested by feeding it events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...errors import Retryable, RowFailed, RunFatal, bad_response
from ...records import ApiRequest, Completion, ManifestRow, PreparedImage, Usage
from ...validate import as_count, as_text, clean_text
from ..options import TOOL_NAME, RequestOptions
from ..sse import Event
from ..tokens import image_tokens, text_tokens

# docs/protocol.md §9.2: one vocabulary for finish reasons, raw value kept beside it.
# Every protocol's reasons by name: chat completions, Messages, Responses (its status or
# incomplete reason, §14.2), Gemini (upper case, §15.3).
_FINISH = {
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "completed": "stop",
    "STOP": "stop",
    "length": "length", "max_tokens": "length", "model_context_window_exceeded": "length",
    "max_output_tokens": "length", "MAX_TOKENS": "length",
    "content_filter": "content_filter", "refusal": "content_filter",
    **dict.fromkeys(("SAFETY", "RECITATION", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII",
                     "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
                     "LANGUAGE"), "content_filter"),
    "tool_calls": "tool_calls", "tool_use": "tool_calls", "function_call": "tool_calls",
    "error": "error", "failed": "error",
    "pause_turn": "paused",  # Anthropic paused a long turn: the text is not a whole caption
    "MALFORMED_FUNCTION_CALL": "bad_tool_call", "UNEXPECTED_TOOL_CALL": "bad_tool_call",
}
# A `length` finish is reasoning_exhausted when at least this share of the output went
# to reasoning (docs/protocol.md §14.3): the caption is missing or a fragment.
REASONING_SHARE = 0.5


@dataclass(frozen=True)
class FollowUp:
    """A second turn on the same image: the model's previous answer and what to change
    (the quality gate's one re-ask, docs/protocol.md §19.5). Each protocol appends it
    as an assistant turn and a user turn after the first user message."""

    answer: str
    instruction: str


@dataclass(frozen=True)
class RequestSpec:
    """What an adapter needs of a run to build its requests (never the whole settings,
    never the key: credentials are added by the transport at send time)."""

    model: str
    max_tokens: int
    system: str | None = None
    options: RequestOptions = field(default_factory=RequestOptions)
    stream: bool = True  # False: ask for one JSON completion (--no-stream)
    follow_up: FollowUp | None = None  # a re-ask: the answer and the instruction


def prompt_of(row: ManifestRow) -> str:
    """The row's prompt, rendered once by the planner (``sources.plan.variants``)."""
    if row.prompt is None:
        raise ValueError(f"row {row.id!r} reached the adapter without its prompt "
                         "(rows are prompted by the planner)")
    return row.prompt


def encode_request(path: str, body: dict[str, Any], row: ManifestRow, image: PreparedImage,
                   spec: RequestSpec) -> ApiRequest:
    """The common tail of every adapter's ``build_request``: vendor fields, the token
    estimate for the budgets (image by the provider's formula, prompt text,
    ``max_tokens`` reserved), and the encoded body."""
    body.update(spec.options.extra_body or {})  # vendor fields, as given
    size = (image.width, image.height) if image.width and image.height else None
    turns = (spec.follow_up.answer, spec.follow_up.instruction) if spec.follow_up else ()
    est_in = (image_tokens(spec.model, size, spec.options.detail)
              + text_tokens(row.prompt, spec.system, *turns))
    accept = "text/event-stream" if spec.stream else "application/json"
    return ApiRequest(path, json.dumps(body, ensure_ascii=False).encode(),
                      {"Accept": accept}, est_in, spec.max_tokens)


def tool_function(schema: dict[str, Any]) -> dict[str, Any]:
    """The one function a ``--tool-schema`` run offers (each protocol wraps it)."""
    return {"name": TOOL_NAME, "description": "Record the caption of the image, "
            "filled in as the parameters describe.", "parameters": schema}


def unavailable(api: str, option: str, why: str) -> RunFatal:
    return RunFatal(f"--{option.replace('_', '-')} is not available with --api {api} ({why})",
                    "config", exit_code=2)


def refuse_options(api: str, options: RequestOptions, names: tuple[str, ...],
                   why: str) -> None:
    """Exit 2 naming the first of ``names`` that is set: this protocol cannot send it."""
    for name in names:
        if getattr(options, name) not in (None, ()):
            raise unavailable(api, name, why)


def normalize_finish(raw: str | None) -> str:
    if not raw:
        return "none"
    return _FINISH.get(raw, "other")


# ---------------------------------------------------------------- values from the wire
# Every adapter reads wire values through these, so a wrongly typed field is coerced
# where its meaning is clear and fails the row as ``bad_response`` where it is not
# (docs/protocol.md §11).

_MAX_ID = 200  # ids and model names are short; a megabyte "id" is not kept whole


def try_json(data: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def label(v: Any, quirks: dict[str, int], name: str) -> str | None:
    """An id or model name: text, or a number taken as its text; other types are
    dropped (and counted), as they only label the row."""
    if v is None or v == "":
        return None
    text = as_text(v, _MAX_ID)
    if text is None:
        quirks[f"bad_{name}"] = quirks.get(f"bad_{name}", 0) + 1
    return text or None


def reason(v: Any, name: str) -> str:
    """A finish/stop reason: text, or empty when absent. Any other type has no meaning
    a caption could be judged by: the row fails (permanently) rather than guessing."""
    if v is None:
        return ""
    if not isinstance(v, str):
        raise bad_response(f"{name} is {json.dumps(v)[:40]} ({type(v).__name__}), not text")
    return clean_text(v)[0]


def content_text(v: Any, where: str) -> str:
    """Text of a ``content`` value: a string, or a list of text parts (Mistral style)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        texts = []
        for part in v:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                t = part.get("text")
                if t is not None and not isinstance(t, str):
                    raise bad_response(f"{where} text part is {type(t).__name__}, not text")
                texts.append(t or "")
            elif not isinstance(part, dict):
                raise bad_response(f"{where} part is {type(part).__name__}")
        return "".join(texts)
    raise bad_response(f"{where} is {type(v).__name__}, not text")


def obj(v: Any, where: str, required: bool = False) -> dict[str, Any]:
    """A JSON object the protocol puts here (absent = empty, unless ``required``: an
    element of a list, where null is no value at all)."""
    if v is None and not required:
        return {}
    if not isinstance(v, dict):
        raise bad_response(f"{where} is {type(v).__name__}, not an object")
    return v


def usage_counts(p: Any, c: Any, t: Any, cached: Any, reasoning: Any = None) -> Usage | None:
    p, c, t, cached = as_count(p), as_count(c), as_count(t), as_count(cached)
    if p is None and c is None:
        return None
    if t is None and p is not None and c is not None:
        t = p + c
    return Usage(p, c, t, cached, as_count(reasoning))


@dataclass(frozen=True, slots=True)
class Extras:
    """What an attempt produced beside its text: the tool call's arguments (the caption
    of a ``--tool-schema`` run), a refusal's text, and how much it reasoned."""

    tool_args: str | None = None
    refusal: str = ""
    reasoning_chars: int = 0  # reasoning text seen (protocols that count no tokens apart)


def reasoning_share(usage: Usage | None, reasoning_chars: int, text: str) -> float:
    """The share of the output that went to reasoning: from the reported token counts,
    else from the reasoning text seen against the caption's."""
    if usage and usage.reasoning_tokens and usage.completion_tokens:
        return usage.reasoning_tokens / usage.completion_tokens
    if reasoning_chars:
        return reasoning_chars / (reasoning_chars + len(text))
    return 0.0


def finish_completion(text: str, raw_finish: str, model: str | None, rid: str | None,
                      usage: Usage | None, terminal: str,
                      quirks: dict[str, int], extras: Extras = Extras()) -> Completion:
    """Apply the success rule to what an attempt produced (shared by all adapters).

    The text is made valid UTF-8 here, once: surrogate halves that arrived in separate
    chunks are joined, lone ones are replaced and counted as ``invalid_text``. With a
    tool call, its arguments are the caption (docs/protocol.md §16).
    """
    if extras.tool_args is not None:
        text = extras.tool_args
    text, replaced = clean_text(text)
    if replaced:
        quirks = {**quirks, "invalid_text": quirks.get("invalid_text", 0) + replaced}
    finish = normalize_finish(raw_finish)
    if finish == "none":
        raise Retryable("stream ended without finish_reason", "stream_broken", http_status=200)
    if finish in ("error", "paused"):
        raise Retryable(f"the answer ended with {raw_finish!r}, not a whole caption",
                        "stream_error", http_status=200)
    if finish == "bad_tool_call":
        raise Retryable(f"the model's tool call was unusable ({raw_finish!r})",
                        "invalid_json", http_status=200)
    def failed(message: str, error_class: str) -> RowFailed:
        # A failed row keeps how the stream ended and what it used.
        return RowFailed(message, error_class, http_status=200, finish_reason_raw=raw_finish,
                         usage=usage)

    if finish == "content_filter" or extras.refusal:
        why = f": {extras.refusal[:200]}" if extras.refusal else ""
        raise failed(f"the model declined (finish_reason {raw_finish!r}){why}", "refused")
    if finish == "length" and reasoning_share(usage, extras.reasoning_chars,
                                              text) >= REASONING_SHARE:
        raise failed(f"the model spent max_tokens reasoning (finish_reason {raw_finish!r}, "
                     f"{len(text.strip())} characters of caption)", "reasoning_exhausted")
    if not text.strip():
        raise failed(f"empty caption (finish_reason {raw_finish!r})", "empty")
    return Completion(text, finish, raw_finish, model, rid, usage, terminal, quirks)


class StreamState(Protocol):
    """Accumulates one attempt's events. ``on_event`` returns True at the terminator."""

    first_content_at: float | None

    def on_event(self, event: Event, now: float) -> bool: ...

    def finish(self) -> Completion: ...


class Adapter(Protocol):
    """One wire protocol: a module of its own plus a line in ``adapters.ADAPTERS``.

    The same adapter serves streamed and non-streamed requests (``RequestSpec.stream``):
    ``build_request`` writes the body (and path) for either, ``new_state`` folds a
    stream, ``from_json`` parses one complete JSON answer. ``from_json`` takes nothing
    but the decoded document, so a provider's batch results (one such document per
    line) are parsed by the very code that parses a ``--no-stream`` answer.
    """

    name: str
    path: str  # the request path (Gemini: a template naming the model and method)
    key_env: tuple[str, ...]  # where its API key is read from, in order

    def check(self, spec: RequestSpec) -> None:
        """RunFatal (exit 2) for an option this protocol has no equivalent for."""
        ...

    def auth_headers(self, api_key: str) -> dict[str, str]: ...

    def build_request(self, row: ManifestRow, image: PreparedImage,
                      spec: RequestSpec) -> ApiRequest: ...

    def new_state(self, n: int = 1) -> StreamState:
        """State for one attempt; ``n`` choices are kept apart when more than one."""
        ...

    def from_json(self, doc: Any) -> Completion:
        """A complete (non-streamed) response body: the Completion, or it raises the
        classified error (an error document, a refusal, an empty answer, ...)."""
        ...
