"""OpenAI-compatible ``/chat/completions`` streaming: request body and chunk folding.

Folding follows docs/protocol.md §2 and §8: text of every choice index folds
into one caption when one choice was asked for (gateways put it on index 1), the first
non-empty finish reason wins (one-api sends ``""`` after the real one), the last
non-null usage wins (never summed), reasoning text stays out, and errors inside the
200 (``error`` objects, ``finish_reason: "error"``, raw JSON lines) end the attempt.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ...errors import PipelineError, Retryable, bad_response, classify_stream_error
from ...records import ApiRequest, Completion, ManifestRow, PreparedImage, Usage
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
    tool_function,
    try_json,
    unavailable,
    usage_counts,
)

if TYPE_CHECKING:
    from ..options import RequestOptions

_loads = json.loads


def parse_usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    details = u.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    out = u.get("completion_tokens_details")
    reasoning = out.get("reasoning_tokens") if isinstance(out, dict) else None
    return usage_counts(u.get("prompt_tokens"), u.get("completion_tokens"),
                        u.get("total_tokens"), cached, reasoning)


class ToolCalls:
    """Streamed tool calls: the arguments text of each call, accumulated per call
    ``index`` (docs/protocol.md §16.1); the caption is the first call's."""

    __slots__ = ("args",)

    def __init__(self) -> None:
        self.args: dict[int, list[str]] = {}

    def add(self, calls: Any) -> None:
        if calls is None:
            return
        if not isinstance(calls, list):
            raise bad_response(f"tool_calls is {type(calls).__name__}, not a list")
        for position, call in enumerate(calls):
            call = obj(call, "a tool call", required=True)
            index = call.get("index", position)
            if isinstance(index, bool) or not isinstance(index, int):
                index = position
            fn = obj(call.get("function"), "tool_calls[].function")
            self.args.setdefault(index, []).append(
                content_text(fn.get("arguments"), "function.arguments"))

    def first(self) -> str | None:
        return "".join(self.args[min(self.args)]) if self.args else None


class ChatStreamState:
    """Folds ``chat.completion.chunk`` events of one attempt.

    One generation per caption (docs/protocol.md §12): a gateway
    that replays an attempt into the same body starts a second generation with a new
    role chunk (often under a new id). That chunk sets a mark; if text follows it,
    everything before the mark is dropped and ``generation_restarted`` counted, so the
    caption is the last generation's text alone. A mark without text after it (a finish
    chunk that repeats the role) changes nothing; servers that repeat ``role`` on every
    content chunk (one-api) never mark. Text under a changed id without a role chunk
    fails the attempt (retryable); a trailing usage-only chunk under another id is fine.
    """

    __slots__ = ("parts", "finish_raw", "usage", "model", "response_id", "done", "tier",
                 "first_content_at", "quirks", "_content_seen", "n", "choices",
                 "finishes", "_role_on_content", "_mark", "_id_switch", "tools", "refusal",
                 "reasoning_chars")

    def __init__(self, n: int = 1) -> None:
        self.n = n
        # n == 1: every index folds into ``parts`` (gateways put text on index 1);
        # n > 1: each index keeps its own text and finish reason.
        self.choices: dict[int, list[str]] = {}
        self.finishes: dict[int, str] = {}
        self.parts: list[str] = []
        self.finish_raw = ""
        self.usage: Any = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.tier: str | None = None  # the service tier the server says it served
        self.done = False
        self.first_content_at: float | None = None
        self.quirks: dict[str, int] = {}
        self._content_seen = False
        self._role_on_content = False  # this server repeats role on content chunks
        self._mark = False  # a second role chunk: a new generation may have begun
        self._id_switch = False  # the id changed after text
        self.tools = ToolCalls()
        self.refusal: list[str] = []  # delta.refusal: structured outputs' refusal text
        self.reasoning_chars = 0  # reasoning_content / reasoning: counted, never kept

    def _quirk(self, name: str) -> None:
        self.quirks[name] = self.quirks.get(name, 0) + 1

    def on_event(self, event: Event, now: float) -> bool:
        data = event.data
        if event.event == "raw":  # bare JSON in an SSE body: a gateway's error
            self._quirk("raw_json_line")
            self._fail(try_json(data), data)
        if data[:6] == "[DONE]":
            self.done = True
            return True
        if event.event == "ping":
            return False
        try:
            chunk = _loads(data)
        except ValueError:
            raise Retryable(f"invalid JSON in stream: {data[:80]!r}", "stream_broken",
                            http_status=200) from None
        if not isinstance(chunk, dict):
            raise Retryable("stream chunk is not a JSON object", "stream_broken", http_status=200)
        if chunk.get("error") or event.event == "error":
            self._fail(chunk, data)  # also OpenRouter's error riding on a normal chunk
        self._fold(chunk, now)
        return False

    def _fold(self, chunk: dict[str, Any], now: float) -> None:
        choices = chunk.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise bad_choices(choices)
        rid = label(chunk.get("id"), self.quirks, "id")
        if rid:
            if self.response_id is None:
                self.response_id = rid
            elif rid != self.response_id:
                if self._content_seen:
                    self._id_switch = True  # judged when text follows (see _choice)
                    self._quirk("id_changed")
                self.response_id = rid
        model = label(chunk.get("model"), self.quirks, "model")
        if model:
            if self.model is not None and model != self.model:
                self._quirk("model_changed")
            self.model = model
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage:
            self.usage = usage
        tier = label(chunk.get("service_tier"), self.quirks, "service_tier")
        if tier:
            self.tier = tier
        for choice in choices or ():
            self._choice(obj(choice, "a choice", required=True), now)

    def _choice(self, choice: dict[str, Any], now: float) -> None:
        index = choice.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            self._quirk("bad_index")
            index = 0
        delta = obj(choice.get("delta"), "delta")
        text = content_text(delta.get("content"), "delta.content")
        self._aside(delta, now)
        if delta.get("role"):
            if text:
                self._role_on_content = True
            elif self._content_seen and not self._role_on_content:
                self._mark = True  # a second role chunk: maybe a second generation
        if text:
            if self._mark:
                self._restart()
            elif self._id_switch:
                # Text under a new id without a new role chunk: not a fresh generation
                # we could keep alone, and never one to concatenate (docs/protocol.md §10 C25, §12).
                raise Retryable("response id changed mid-stream (gateway replay)",
                                "stream_broken", http_status=200)
            if self.first_content_at is None:
                self.first_content_at = now
            self._content_seen = True
            if self.n > 1:
                self.choices.setdefault(index, []).append(text)
            else:
                if index:
                    self._quirk("nonzero_index")
                self.parts.append(text)
        fr = reason(choice.get("finish_reason"), "finish_reason")
        if fr:
            self._finish(index, fr)

    def _aside(self, delta: dict[str, Any], now: float) -> None:
        """What a delta carries beside content: tool calls, refusal, reasoning."""
        if delta.get("tool_calls") is not None:
            if self._mark:
                self._restart()
            self.tools.add(delta.get("tool_calls"))
            if self.first_content_at is None:
                self.first_content_at = now
            self._content_seen = True
        refusal = content_text(delta.get("refusal"), "delta.refusal")
        if refusal:
            self.refusal.append(refusal)
        for name in ("reasoning_content", "reasoning"):
            thought = delta.get(name)
            if isinstance(thought, str):
                self.reasoning_chars += len(thought)

    def _restart(self) -> None:
        """Text follows a new-generation mark: keep only what comes from here on."""
        self._quirk("generation_restarted")
        self.tools = ToolCalls()
        self.refusal.clear()
        self.parts.clear()
        self.choices.clear()
        self.finishes.clear()
        self.finish_raw = ""
        self._mark = self._id_switch = False

    def _finish(self, index: int, fr: str) -> None:
        if self.n > 1:
            self.finishes.setdefault(index, fr)
            if index != 0:
                return
        if self.finish_raw:
            self._quirk("duplicate_finish")
        else:
            self.finish_raw = fr

    def _fail(self, doc: Any, data: str) -> None:
        if not isinstance(doc, dict):
            doc = {"error": {"message": data[:200]}}
        error: PipelineError = classify_stream_error(doc)
        raise error

    def finish(self) -> Completion:
        terminal = "done" if self.done else "eof_after_finish"
        if self.n == 1:
            extras = Extras(self.tools.first(), "".join(self.refusal), self.reasoning_chars)
            return replace(finish_completion("".join(self.parts), self.finish_raw, self.model,
                                             self.response_id, parse_usage(self.usage),
                                             terminal, self.quirks, extras),
                           service_tier=self.tier)
        missing = [i for i in range(self.n) if i not in self.finishes]
        if missing:
            raise Retryable(f"stream ended without finish_reason for choice {missing[0]}",
                            "stream_broken", http_status=200)
        texts = tuple("".join(self.choices.get(i, ())) for i in range(self.n))
        first = finish_completion(texts[0], self.finish_raw, self.model, self.response_id,
                                  parse_usage(self.usage), terminal, self.quirks)
        return replace(first, texts=texts, service_tier=self.tier)


def bad_choices(v: Any) -> PipelineError:
    return bad_response(f"choices is {type(v).__name__}, not a list")


class OpenAIChat:
    """The OpenAI-compatible chat-completions protocol."""

    name = "openai"
    path = "/chat/completions"
    key_env: tuple[str, ...] = ("CAPTION_API_KEY", "OPENAI_API_KEY")

    def check(self, spec: RequestSpec) -> None:
        # Every option of RequestOptions has its chat-completions field.
        if spec.options.tool_schema is not None and spec.options.n != 1:
            raise unavailable(self.name, "n", "a --tool-schema caption is one tool call")

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def build_request(self, row: ManifestRow, image: PreparedImage,
                      spec: RequestSpec) -> ApiRequest:
        messages: list[dict[str, Any]] = []
        if spec.system:
            messages.append({"role": "system", "content": spec.system})
        image_url: dict[str, Any] = {"url": image.url}
        if spec.options.detail:
            image_url["detail"] = spec.options.detail  # docs/protocol.md §7.2
        messages.append({"role": "user", "content": [
            {"type": "text", "text": prompt_of(row)},
            {"type": "image_url", "image_url": image_url},
        ]})
        if spec.follow_up:  # docs/protocol.md §19.5
            messages += [{"role": "assistant", "content": spec.follow_up.answer},
                         {"role": "user", "content": spec.follow_up.instruction}]
        body: dict[str, Any] = {"model": spec.model, "messages": messages,
                                "stream": spec.stream, "max_tokens": spec.max_tokens}
        if spec.stream:
            body["stream_options"] = {"include_usage": True}
        body.update(self.option_fields(spec.options))
        return encode_request(self.path, body, row, image, spec)

    @staticmethod
    def option_fields(o: RequestOptions) -> dict[str, Any]:
        body = o.given("temperature", "top_p", "presence_penalty", "frequency_penalty",
                       "logit_bias", "user", "seed", "response_format", "service_tier")
        if o.n != 1:
            body["n"] = o.n
        if o.stop:
            body["stop"] = list(o.stop)
        if o.reasoning_effort:  # sent as asked, "none" too (docs/protocol.md §14.3)
            body["reasoning_effort"] = o.reasoning_effort
        if o.tool_schema is not None:
            body["tools"] = [{"type": "function", "function": tool_function(o.tool_schema)}]
            body["tool_choice"] = {"type": "function", "function": {"name": TOOL_NAME}}
        return body

    def new_state(self, n: int = 1) -> ChatStreamState:
        return ChatStreamState(n)

    def from_json(self, doc: Any) -> Completion:
        if not isinstance(doc, dict) or doc.get("error") or not doc.get("choices"):
            raise classify_stream_error(doc if isinstance(doc, dict) else {"error": str(doc)})
        choices = doc["choices"]
        if not isinstance(choices, list):
            raise bad_choices(choices)
        choice = obj(choices[0], "a choice", required=True)
        msg = obj(choice.get("message"), "message")
        quirks: dict[str, int] = {}
        tools = ToolCalls()
        tools.add(msg.get("tool_calls"))
        thought = msg.get("reasoning_content") or msg.get("reasoning")
        extras = Extras(tools.first(), content_text(msg.get("refusal"), "message.refusal"),
                        len(thought) if isinstance(thought, str) else 0)
        done = finish_completion(content_text(msg.get("content"), "message.content"),
                                 reason(choice.get("finish_reason"), "finish_reason"),
                                 label(doc.get("model"), quirks, "model"),
                                 label(doc.get("id"), quirks, "id"),
                                 parse_usage(doc.get("usage")), "json", quirks, extras)
        return replace(done, service_tier=label(doc.get("service_tier"), quirks,
                                                "service_tier"))


def with_service_tier(req: ApiRequest, tier: str) -> ApiRequest:
    """The same request on another service tier (a flex row falling back to the
    standard tier: docs/protocol.md §18)."""
    body = json.loads(req.body)
    body["service_tier"] = tier
    return replace(req, body=json.dumps(body, ensure_ascii=False).encode())
