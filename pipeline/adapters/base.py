"""The seam between the pipeline and a wire protocol.

An adapter builds the request body for one row and folds the decoded SSE events of a
response into a ``Completion``. Adapters are pure: no HTTP, no files, so each can be
tested by feeding it events.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol

from ..records import ApiRequest, Completion, ManifestRow, PreparedImage
from ..sse import Event
from ..tokens import image_tokens, text_tokens

if TYPE_CHECKING:
    from ..settings import Settings

# protocol-reference section 8: one vocabulary for finish reasons, raw value kept beside it.
_FINISH = {
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop",
    "length": "length", "max_tokens": "length", "model_context_window_exceeded": "length",
    "content_filter": "content_filter", "refusal": "content_filter",
    "tool_calls": "tool_calls", "tool_use": "tool_calls", "function_call": "tool_calls",
    "error": "error",
}


def encode_request(path: str, body: dict[str, Any], row: ManifestRow, image: PreparedImage,
                   settings: Settings) -> ApiRequest:
    """The common tail of every adapter's ``build_request``: vendor fields, the token
    estimate for the budgets (image by the provider's formula, prompt text,
    ``max_tokens`` reserved), and the encoded body."""
    body.update(settings.options.extra_body or {})  # vendor fields, as given
    size = (image.width, image.height) if image.width and image.height else None
    est_in = image_tokens(settings.model, size) + text_tokens(row.prompt, settings.system)
    return ApiRequest(path, json.dumps(body, ensure_ascii=False).encode(),
                      {"Accept": "text/event-stream"}, est_in, settings.max_tokens)


def normalize_finish(raw: str | None) -> str:
    if not raw:
        return "none"
    return _FINISH.get(raw, "other")


class StreamState(Protocol):
    """Accumulates one attempt's events. ``on_event`` returns True at the terminator."""

    first_content_at: float | None

    def on_event(self, event: Event, now: float) -> bool: ...

    def finish(self) -> Completion: ...


class Adapter(Protocol):
    name: str
    path: str

    def auth_headers(self, api_key: str) -> dict[str, str]: ...

    def build_request(self, row: ManifestRow, image: PreparedImage,
                      settings: Settings) -> ApiRequest: ...

    def new_state(self, n: int = 1) -> StreamState:
        """State for one attempt; ``n`` choices are kept apart when more than one."""
        ...

    def from_json(self, doc: Any) -> Completion:
        """A complete (non-streamed) response body sent instead of a stream."""
        ...
