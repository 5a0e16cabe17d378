"""OpenAI Responses API (``/responses``): request body, stream fold and JSON completion.

Folding follows docs/protocol.md §14: every event names its ``type`` (the SSE event
name repeats it) and carries a ``sequence_number``; a number that is not the one after
the last is a gap, counted in ``quirks`` (``sequence_gap``), never a failure. Only
``response.output_text.delta`` reaches the caption; refusal text is kept apart (the row
is ``refused``), function-call arguments are accumulated per output index (the caption
of a ``--tool-schema`` run), reasoning summaries stay out. The stream ends with
``response.completed``, ``response.incomplete`` or ``response.failed`` (there is no
``[DONE]``); an ``error`` event ends the attempt; every other type is ignored.
"""

from __future__ import annotations

from typing import Any

from ...errors import Retryable, classify_stream_error
from ...records import ApiRequest, Completion, ManifestRow, PreparedImage, Usage
from ..options import TOOL_NAME, RequestOptions
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

_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def parse_usage(u: Any) -> Usage | None:
    """``input_tokens`` (cached ones among them), ``output_tokens`` (reasoning among
    them), ``total_tokens`` (docs/protocol.md §14.4)."""
    if not isinstance(u, dict):
        return None
    cached = u.get("input_tokens_details")
    out = u.get("output_tokens_details")
    return usage_counts(u.get("input_tokens"), u.get("output_tokens"), u.get("total_tokens"),
                        cached.get("cached_tokens") if isinstance(cached, dict) else None,
                        out.get("reasoning_tokens") if isinstance(out, dict) else None)


def finish_of(response: dict[str, Any]) -> str:
    """The raw finish of a response object: its ``incomplete_details.reason`` when it is
    incomplete (``max_output_tokens``, ``content_filter``), else its ``status``."""
    status = reason(response.get("status"), "response.status")
    if status == "incomplete":
        details = obj(response.get("incomplete_details"), "incomplete_details")
        return reason(details.get("reason"), "incomplete_details.reason") or "incomplete"
    return status


def _failed(response: dict[str, Any]) -> Exception:
    """``response.failed``: its error object, classified like any error in a 200."""
    error = response.get("error")
    doc = {"error": error if isinstance(error, dict) else {"message": "response failed"}}
    return classify_stream_error(doc)


class ResponsesStreamState:
    """Folds the typed events of one Responses stream."""

    __slots__ = ("first_content_at", "model", "parts", "quirks", "response_id", "finish_raw",
                 "usage", "ended", "tools", "refusal", "_seq")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.refusal: list[str] = []
        self.tools: dict[int, list[str]] = {}  # output_index → argument pieces
        self.finish_raw = ""
        self.usage: Usage | None = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.ended = False
        self.first_content_at: float | None = None
        self.quirks: dict[str, int] = {}
        self._seq: int | None = None

    def _quirk(self, name: str) -> None:
        self.quirks[name] = self.quirks.get(name, 0) + 1

    def on_event(self, event: Event, now: float) -> bool:
        if event.event == "raw":  # bare JSON in an SSE body: a gateway's error
            self._quirk("raw_json_line")
            doc = try_json(event.data)
            raise classify_stream_error(doc if isinstance(doc, dict)
                                        else {"error": {"message": event.data[:200]}})
        if event.event == "ping" or event.data[:6] == "[DONE]":
            return False  # not part of this protocol; a gateway's habit, harmless
        doc = try_json(event.data)
        if not isinstance(doc, dict):
            raise Retryable(f"invalid JSON in stream: {event.data[:80]!r}", "stream_broken",
                            http_status=200)
        kind = doc["type"] if isinstance(doc.get("type"), str) else event.event
        self._sequence(doc.get("sequence_number"))
        if kind == "error" or (kind == "message" and doc.get("error")):
            raise classify_stream_error({"error": doc.get("error") or doc})
        return self._dispatch(kind, doc, now)

    def _sequence(self, n: Any) -> None:
        if isinstance(n, bool) or not isinstance(n, int):
            return
        if self._seq is not None and n != self._seq + 1:
            self._quirk("sequence_gap")  # events lost or reordered on the way (§14.2)
        self._seq = n

    def _dispatch(self, kind: str, doc: dict[str, Any], now: float) -> bool:
        if kind == "response.output_text.delta":
            text = content_text(doc.get("delta"), "output_text.delta")
            if text:
                self._first(now)
                self.parts.append(text)
        elif kind == "response.refusal.delta":
            self.refusal.append(content_text(doc.get("delta"), "refusal.delta"))
        elif kind == "response.function_call_arguments.delta":
            index = doc.get("output_index")
            index = index if isinstance(index, int) and not isinstance(index, bool) else 0
            self.tools.setdefault(index, []).append(
                content_text(doc.get("delta"), "function_call_arguments.delta"))
            self._first(now)
        elif kind in ("response.created", "response.in_progress"):
            self._head(obj(doc.get("response"), f"{kind}.response"))
        elif kind in _TERMINAL:
            response = obj(doc.get("response"), f"{kind}.response")
            self._head(response)
            if kind == "response.failed":
                raise _failed(response)
            self.finish_raw = finish_of(response)
            self.usage = parse_usage(response.get("usage"))
            self.ended = True
            return True
        # output_item.*, content_part.*, *.done, reasoning_summary_*, and types added
        # later: nothing a caption needs (the deltas already carried the text).
        return False

    def _first(self, now: float) -> None:
        if self.first_content_at is None:
            self.first_content_at = now

    def _head(self, response: dict[str, Any]) -> None:
        self.response_id = label(response.get("id"), self.quirks, "id") or self.response_id
        self.model = label(response.get("model"), self.quirks, "model") or self.model

    def finish(self) -> Completion:
        if not self.ended:
            raise Retryable("stream ended before response.completed", "stream_broken",
                            http_status=200)
        args = "".join(self.tools[min(self.tools)]) if self.tools else None
        return finish_completion("".join(self.parts), self.finish_raw, self.model,
                                 self.response_id, self.usage, "completed", self.quirks,
                                 Extras(args, "".join(self.refusal)))


class OpenAIResponses:
    """OpenAI's Responses protocol."""

    name = "responses"
    path = "/responses"
    key_env: tuple[str, ...] = ("CAPTION_API_KEY", "OPENAI_API_KEY")
    _UNSUPPORTED = ("stop", "presence_penalty", "frequency_penalty", "logit_bias", "seed")

    def check(self, spec: RequestSpec) -> None:
        refuse_options(self.name, spec.options, self._UNSUPPORTED,
                       "the Responses API has no such option")
        if spec.options.n != 1:
            raise unavailable(self.name, "n", "the Responses API returns one answer")

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def build_request(self, row: ManifestRow, image: PreparedImage,
                      spec: RequestSpec) -> ApiRequest:
        part: dict[str, Any] = {"type": "input_image", "image_url": image.url}
        if spec.options.detail:
            part["detail"] = spec.options.detail
        content = [{"type": "input_text", "text": prompt_of(row)}, part]
        turns: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if spec.follow_up:  # docs/protocol.md §19.5: earlier output is output_text
            turns += [{"role": "assistant", "content": [
                          {"type": "output_text", "text": spec.follow_up.answer}]},
                      {"role": "user", "content": [
                          {"type": "input_text", "text": spec.follow_up.instruction}]}]
        body: dict[str, Any] = {"model": spec.model, "input": turns,
                                "max_output_tokens": spec.max_tokens, "stream": spec.stream,
                                "store": False}  # a caption need not be kept server-side
        if spec.system:
            body["instructions"] = spec.system
        body.update(self.option_fields(spec.options))
        return encode_request(self.path, body, row, image, spec)

    @staticmethod
    def option_fields(o: RequestOptions) -> dict[str, Any]:
        body = o.given("temperature", "top_p", "user")
        if o.response_format is not None:
            body["text"] = {"format": text_format(o.response_format)}
        if o.reasoning_effort:
            body["reasoning"] = {"effort": o.reasoning_effort}
        if o.tool_schema is not None:
            fn = tool_function(o.tool_schema)
            body["tools"] = [{"type": "function", **fn}]
            body["tool_choice"] = {"type": "function", "name": TOOL_NAME}
        return body

    def new_state(self, n: int = 1) -> ResponsesStreamState:
        return ResponsesStreamState()

    def from_json(self, doc: Any) -> Completion:
        if not isinstance(doc, dict) or doc.get("object") not in (None, "response") \
                or (doc.get("error") and doc.get("status") != "failed") or "output" not in doc:
            raise classify_stream_error(doc if isinstance(doc, dict) else {"error": str(doc)})
        if doc.get("status") == "failed":
            raise _failed(doc)
        texts, refusal, tools = [], [], []
        output = doc.get("output")
        for item in output if isinstance(output, list) else ():
            item = obj(item, "an output item", required=True)
            if item.get("type") == "function_call":
                tools.append(content_text(item.get("arguments"), "function_call.arguments"))
            content = item.get("content") if item.get("type") == "message" else None
            for part in content if isinstance(content, list) else ():
                part = obj(part, "an output content part", required=True)
                if part.get("type") == "output_text":
                    texts.append(content_text(part.get("text"), "output_text.text"))
                elif part.get("type") == "refusal":
                    refusal.append(content_text(part.get("refusal"), "refusal"))
        quirks: dict[str, int] = {}
        return finish_completion("".join(texts), finish_of(doc),
                                 label(doc.get("model"), quirks, "model"),
                                 label(doc.get("id"), quirks, "id"),
                                 parse_usage(doc.get("usage")), "json", quirks,
                                 Extras(tools[0] if tools else None, "".join(refusal)))


def text_format(response_format: dict[str, Any]) -> dict[str, Any]:
    """Chat's ``response_format`` as the Responses API's ``text.format``: the schema
    envelope is flattened (``name``, ``schema``, ``strict`` beside ``type``)."""
    if response_format.get("type") == "json_schema":
        return {"type": "json_schema", **response_format.get("json_schema", {})}
    return dict(response_format)


__all__ = ["OpenAIResponses", "ResponsesStreamState"]
