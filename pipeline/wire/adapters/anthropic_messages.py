"""Anthropic Messages API (``/messages``) streaming: request body and event folding.

Folding follows docs/protocol.md §3, §8 and §9: events are dispatched by their
SSE name (the JSON ``type`` when a gateway drops the name); only ``text_delta`` text
reaches the caption (thinking and signatures stay out); usage is ``message_start``'s
overlaid with each ``message_delta``'s non-null counts (cumulative, never summed);
``event: error`` inside the 200 ends the attempt. The success rule is the one shared
with the OpenAI adapter (``finish_completion``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ...errors import Retryable, RowFailed, RunFatal, bad_response, classify_stream_error
from ...records import ApiRequest, Completion, ManifestRow, PreparedImage, Usage
from ...validate import as_count
from ..options import TOOL_NAME
from ..sse import Event
from .base import (
    Extras,
    RequestSpec,
    content_text,
    encode_request,
    finish_completion,
    label,
    obj,
    prompt_of,
    reason,
    refuse_options,
    tool_function,
    try_json,
    unavailable,
    usage_counts,
)

if TYPE_CHECKING:
    from ..options import RequestOptions

API_VERSION = "2023-06-01"
# --reasoning-effort → thinking.budget_tokens (docs/protocol.md §14.3); the API wants at
# least 1024 and less than max_tokens, so a budget above max_tokens is cut to fit.
THINKING_BUDGET = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}
MIN_THINKING = 1024
_CACHE_FIELDS = ("cache_creation_input_tokens", "cache_read_input_tokens")


def parse_usage(u: Any) -> Usage | None:
    """Anthropic usage → Usage. ``input_tokens`` counts only what follows the last cache
    breakpoint, so the prompt is input + cache creation + cache read (docs/protocol.md §3.3)."""
    if not isinstance(u, dict):
        return None
    parts = [as_count(u.get(k)) for k in ("input_tokens", *_CACHE_FIELDS)]
    known = [p for p in parts if p is not None]
    prompt = sum(known) if known else None
    return usage_counts(prompt, u.get("output_tokens"), None,
                        u.get("cache_read_input_tokens"))


def _broken(message: str) -> Retryable:
    return Retryable(message, "stream_broken", http_status=200)


class MessagesStreamState:
    """Folds the named events of one Messages API stream.

    One generation per caption (docs/protocol.md §12): a second
    ``message_start``, or a text block that starts again at an index already used,
    means a gateway replayed the answer into the same body. The text so far is
    dropped (``generation_restarted`` counted) and the fold goes on with the new one.
    """

    __slots__ = ("first_content_at", "model", "parts", "quirks", "response_id", "stop_reason",
                 "stopped", "usage", "_blocks", "tools", "reasoning_chars")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.stop_reason = ""
        self.usage: dict[str, Any] = {}
        self.model: str | None = None
        self.response_id: str | None = None
        self.stopped = False
        self.first_content_at: float | None = None
        self.quirks: dict[str, int] = {}
        self._blocks: set[int] = set()  # content block indexes started so far
        self.tools: dict[int, list[str]] = {}  # tool_use block index → input_json parts
        self.reasoning_chars = 0  # thinking text seen: counted, never kept

    def _quirk(self, name: str) -> None:
        self.quirks[name] = self.quirks.get(name, 0) + 1

    def on_event(self, event: Event, now: float) -> bool:
        name = event.event
        if name == "raw":  # bare JSON in an SSE body: a gateway's error (docs/protocol.md §8.10)
            self._quirk("raw_json_line")
            doc = try_json(event.data)
            raise classify_stream_error(doc if isinstance(doc, dict)
                                        else {"error": {"message": event.data[:200]}})
        if name == "ping":  # liveness only; its data need not even be JSON
            return False
        try:
            doc = json.loads(event.data)
        except ValueError:
            raise _broken(f"invalid JSON in stream: {event.data[:80]!r}") from None
        if not isinstance(doc, dict):
            raise _broken("stream event is not a JSON object")
        kind = name if name != "message" else str(doc.get("type") or "")
        if kind == "error" or doc.get("error"):  # also an OpenAI-style error a gateway wrote
            raise classify_stream_error(doc)
        return self._dispatch(kind, doc, now)

    def _dispatch(self, kind: str, doc: dict[str, Any], now: float) -> bool:
        if kind == "message_start":
            self._start(obj(doc.get("message"), "message_start.message"))
        elif kind == "content_block_start":
            block = obj(doc.get("content_block"), "content_block")
            if block.get("type") == "text":
                self._block(doc.get("index"))
                self._text(content_text(block.get("text"), "content_block.text"), now)
            elif block.get("type") == "tool_use":
                self._block(doc.get("index"))
                self.tools[_index(doc.get("index"))] = []
        elif kind == "content_block_delta":
            self._delta(obj(doc.get("delta"), "delta"), doc.get("index"), now)
        elif kind == "message_delta":
            delta = obj(doc.get("delta"), "message_delta.delta")
            stop = reason(delta.get("stop_reason"), "stop_reason")
            if stop:
                if self.stop_reason and stop != self.stop_reason:
                    self._quirk("stop_reason_changed")
                self.stop_reason = stop  # the last top-level change is the message's
            self._merge_usage(doc.get("usage"))
        elif kind == "message_stop":
            self.stopped = True
            return True
        # content_block_stop and event types added later carry nothing a caption needs.
        return False

    def _delta(self, delta: dict[str, Any], index: Any, now: float) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            self._text(content_text(delta.get("text"), "text_delta.text"), now)
        elif kind == "input_json_delta":  # a tool call's arguments, in pieces (§16.1)
            part = content_text(delta.get("partial_json"), "input_json_delta.partial_json")
            self.tools.setdefault(_index(index), []).append(part)
            if self.first_content_at is None:
                self.first_content_at = now
        elif kind == "thinking_delta":
            thought = delta.get("thinking")
            self.reasoning_chars += len(thought) if isinstance(thought, str) else 0
        # signature_delta and later kinds: never part of the caption

    def _start(self, message: dict[str, Any]) -> None:
        if self.parts:
            self._restart()  # a gateway replayed the answer into the same body
        rid = label(message.get("id"), self.quirks, "id")
        model = label(message.get("model"), self.quirks, "model")
        if model and self.model and model != self.model:
            self._quirk("model_changed")
        self.response_id = rid or self.response_id
        self.model = model or self.model
        self._merge_usage(message.get("usage"))

    def _block(self, index: Any) -> None:
        if isinstance(index, int) and not isinstance(index, bool):
            if index in self._blocks and self.parts:
                self._restart()  # a content index reset: the answer started over
            self._blocks.add(index)

    def _restart(self) -> None:
        self._quirk("generation_restarted")
        self.parts.clear()
        self.tools.clear()
        self._blocks.clear()
        self.stop_reason = ""

    def _text(self, text: str, now: float) -> None:
        if text:
            if self.first_content_at is None:
                self.first_content_at = now
            self.parts.append(text)

    def _merge_usage(self, usage: Any) -> None:
        # Counts are cumulative: overwrite field by field, and only with present,
        # non-null values, as the SDK does (a message_delta usually carries output only).
        if isinstance(usage, dict):
            self.usage.update((k, v) for k, v in usage.items() if v is not None)

    def finish(self) -> Completion:
        if not self.stopped and not self.stop_reason:
            # EOF before message_delta (docs/protocol.md §10 C38): the partial text is not
            # a caption.
            raise _broken("stream ended without stop_reason or message_stop")
        # A stop_reason followed by a clean EOF is complete, as for OpenAI's missing [DONE].
        terminal = "message_stop" if self.stopped else "eof_after_finish"
        args = "".join(self.tools[min(self.tools)]) if self.tools else None
        return finish_completion("".join(self.parts), self.stop_reason, self.model,
                                 self.response_id, parse_usage(self.usage or None), terminal,
                                 self.quirks, Extras(args, "", self.reasoning_chars))


class AnthropicMessages:
    """The Anthropic Messages protocol."""

    name = "anthropic"
    path = "/messages"
    key_env: tuple[str, ...] = ("CAPTION_API_KEY", "ANTHROPIC_API_KEY")
    _UNSUPPORTED = ("presence_penalty", "frequency_penalty", "logit_bias", "seed",
                    "response_format", "detail")

    def check(self, spec: RequestSpec) -> None:
        options = spec.options
        refuse_options(self.name, options, self._UNSUPPORTED,
                       "the Messages API has no such option")
        if options.service_tier is not None:
            raise unavailable(self.name, "service_tier", "flex is OpenAI's tier; Anthropic's "
                              "service_tier values differ")
        if options.n != 1:
            raise RunFatal("--n > 1 is not available with --api anthropic (the Messages "
                           "API returns one answer per request)", "config", exit_code=2)
        effort = options.reasoning_effort
        if effort not in (None, "none"):
            if spec.max_tokens <= MIN_THINKING:
                raise RunFatal(f"--reasoning-effort {effort} with --api anthropic needs "
                               f"--max-tokens above {MIN_THINKING} (thinking.budget_tokens "
                               f"is at least {MIN_THINKING} and below max_tokens)", "config",
                               exit_code=2)
            if options.tool_schema is not None:
                raise unavailable(self.name, "tool_schema", "a forced tool call cannot be "
                                  "combined with thinking; use --reasoning-effort none")

    def auth_headers(self, api_key: str) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def build_request(self, row: ManifestRow, image: PreparedImage,
                      spec: RequestSpec) -> ApiRequest:
        # Anthropic recommends the image before the text.
        content = [image_block(image), {"type": "text", "text": prompt_of(row)}]
        body: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens,
                                "stream": spec.stream}
        if spec.system:
            body["system"] = spec.system  # top-level: the API has no system role
        body["messages"] = [{"role": "user", "content": content}]
        if spec.follow_up:  # docs/protocol.md §19.5: turns alternate user/assistant
            body["messages"] += [
                {"role": "assistant", "content": [{"type": "text",
                                                   "text": spec.follow_up.answer}]},
                {"role": "user", "content": [{"type": "text",
                                              "text": spec.follow_up.instruction}]}]
        body.update(self.option_fields(spec.options))
        effort = spec.options.reasoning_effort
        if effort == "none":
            body["thinking"] = {"type": "disabled"}
        elif effort is not None:
            budget = min(THINKING_BUDGET[effort], spec.max_tokens - 1)
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        return encode_request(self.path, body, row, image, spec)

    @staticmethod
    def option_fields(o: RequestOptions) -> dict[str, Any]:
        body = o.given("temperature", "top_p")
        if o.stop:
            body["stop_sequences"] = list(o.stop)
        if o.user:
            body["metadata"] = {"user_id": o.user}
        if o.tool_schema is not None:
            fn = tool_function(o.tool_schema)
            body["tools"] = [{"name": fn["name"], "description": fn["description"],
                              "input_schema": fn["parameters"]}]
            body["tool_choice"] = {"type": "tool", "name": TOOL_NAME}
        return body

    def new_state(self, n: int = 1) -> MessagesStreamState:
        return MessagesStreamState()

    def from_json(self, doc: Any) -> Completion:
        if not isinstance(doc, dict) or doc.get("type") != "message" or doc.get("error"):
            raise classify_stream_error(doc if isinstance(doc, dict) else {"error": str(doc)})
        blocks = doc.get("content") or []
        if not isinstance(blocks, list):
            raise bad_response(f"content is {type(blocks).__name__}, not a list")
        blocks = [obj(b, "a content block", required=True) for b in blocks]
        text = "".join(content_text(b.get("text"), "content[].text") for b in blocks
                       if b.get("type") == "text")
        calls = [b for b in blocks if b.get("type") == "tool_use"]
        args = json.dumps(obj(calls[0].get("input"), "tool_use.input"),
                          ensure_ascii=False) if calls else None
        thought = sum(len(b["thinking"]) for b in blocks if b.get("type") == "thinking"
                      and isinstance(b.get("thinking"), str))
        quirks: dict[str, int] = {}
        return finish_completion(text, reason(doc.get("stop_reason"), "stop_reason"),
                                 label(doc.get("model"), quirks, "model"),
                                 label(doc.get("id"), quirks, "id"),
                                 parse_usage(doc.get("usage")), "json", quirks,
                                 Extras(args, "", thought))


def _index(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def image_block(image: PreparedImage) -> dict[str, Any]:
    """A data: URI becomes a base64 source (payload without the prefix); a URL is
    passed through for Anthropic to fetch (docs/protocol.md §3.1)."""
    url = image.url
    if url[:5].lower() == "data:":
        header, sep, payload = url[5:].partition(",")
        params = header.split(";")
        if not sep or "base64" not in params[1:]:
            raise RowFailed("image data URI is not base64-encoded", "bad_image")
        mime = params[0] or image.mime
        return {"type": "image",
                "source": {"type": "base64", "media_type": mime, "data": payload}}
    return {"type": "image", "source": {"type": "url", "url": url}}
