"""OpenAI-compatible ``/chat/completions`` streaming: request body and chunk folding.

Folding follows protocol-reference sections 2 and 7: text of every choice index folds
into one caption when one choice was asked for (gateways put it on index 1), the first
non-empty finish reason wins (one-api sends ``""`` after the real one), the last
non-null usage wins (never summed), reasoning text stays out, and errors inside the
200 (``error`` objects, ``finish_reason: "error"``, raw JSON lines) end the attempt.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import PipelineError, Retryable, RowFailed, classify_stream_error
from ..records import ApiRequest, Completion, ManifestRow, PreparedImage, Usage
from ..sse import Event
from .base import encode_request, normalize_finish

if TYPE_CHECKING:
    from ..settings import Settings

_loads = json.loads


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def parse_usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    details = u.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    p, c = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
    t = _int(u.get("total_tokens"))
    if t is None and p is not None and c is not None:
        t = p + c
    return Usage(p, c, t, cached)


def finish_completion(text: str, raw_finish: str, model: str | None, rid: str | None,
                      usage: Usage | None, terminal: str,
                      quirks: dict[str, int]) -> Completion:
    """Apply the success rule to what an attempt produced (shared by all adapters)."""
    finish = normalize_finish(raw_finish)
    if finish == "none":
        raise Retryable("stream ended without finish_reason", "stream_broken", http_status=200)
    if finish == "error":
        raise Retryable("stream ended with finish_reason 'error'", "stream_error",
                        http_status=200)
    failure = None
    if finish == "content_filter":
        failure = RowFailed(f"the model declined (finish_reason {raw_finish!r})", "refused",
                            http_status=200)
    elif not text.strip():
        failure = RowFailed(f"empty caption (finish_reason {raw_finish!r})", "empty",
                            http_status=200)
    if failure is not None:
        failure.finish_reason_raw = raw_finish  # the row keeps how the stream ended
        failure.usage = usage
        raise failure
    return Completion(text, finish, raw_finish, model, rid, usage, terminal, quirks)


class ChatStreamState:
    """Folds ``chat.completion.chunk`` events of one attempt."""

    __slots__ = ("parts", "finish_raw", "usage", "model", "response_id", "done",
                 "first_content_at", "quirks", "_error", "_content_seen", "n", "choices",
                 "finishes")

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
        self.done = False
        self.first_content_at: float | None = None
        self.quirks: dict[str, int] = {}
        self._error: PipelineError | None = None
        self._content_seen = False

    def _quirk(self, name: str) -> None:
        self.quirks[name] = self.quirks.get(name, 0) + 1

    def on_event(self, event: Event, now: float) -> bool:
        data = event.data
        if event.event == "raw":  # bare JSON in an SSE body: a gateway's error
            self._quirk("raw_json_line")
            self._fail(_try_json(data), data)
            return True
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
        rid = chunk.get("id")
        if rid:
            if self.response_id is None:
                self.response_id = rid
            elif rid != self.response_id and self._content_seen:
                # A gateway replayed a second attempt into the same body: never
                # concatenate attempts (protocol-reference C25).
                raise Retryable("response id changed mid-stream (gateway replay)",
                                "stream_broken", http_status=200)
        if chunk.get("model"):
            self.model = chunk["model"]
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            if delta:
                content = delta.get("content")
                if content:
                    if self.first_content_at is None:
                        self.first_content_at = now
                    self._content_seen = True
                    if self.n > 1:
                        self.choices.setdefault(choice.get("index", 0), []).append(content)
                    else:
                        if choice.get("index", 0):
                            self._quirk("nonzero_index")
                        self.parts.append(content)
            fr = choice.get("finish_reason")
            if fr:
                self._finish(choice.get("index", 0), fr)

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
        if doc is None:
            doc = {"error": {"message": data[:200]}}
        self._error = classify_stream_error(doc)
        raise self._error

    def finish(self) -> Completion:
        terminal = "done" if self.done else "eof_after_finish"
        if self.n == 1:
            return finish_completion("".join(self.parts), self.finish_raw, self.model,
                                     self.response_id, parse_usage(self.usage), terminal,
                                     self.quirks)
        missing = [i for i in range(self.n) if i not in self.finishes]
        if missing:
            raise Retryable(f"stream ended without finish_reason for choice {missing[0]}",
                            "stream_broken", http_status=200)
        texts = tuple("".join(self.choices.get(i, ())) for i in range(self.n))
        first = finish_completion(texts[0], self.finish_raw, self.model, self.response_id,
                                  parse_usage(self.usage), terminal, self.quirks)
        return replace(first, texts=texts)


def _try_json(data: str) -> Any:
    try:
        return _loads(data)
    except ValueError:
        return None


class OpenAIChat:
    """The OpenAI-compatible chat-completions protocol."""

    name = "openai"
    path = "/chat/completions"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def build_request(self, row: ManifestRow, image: PreparedImage,
                      settings: Settings) -> ApiRequest:
        messages: list[dict[str, Any]] = []
        if settings.system:
            messages.append({"role": "system", "content": settings.system})
        prompt = row.prompt or settings.prompt
        messages.append({"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": image.url}},
        ]})
        body: dict[str, Any] = {
            "model": settings.model, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": settings.max_tokens,
        }
        body.update(settings.options.openai_fields())
        return encode_request(self.path, body, replace(row, prompt=prompt), image, settings)

    def new_state(self, n: int = 1) -> ChatStreamState:
        return ChatStreamState(n)

    def from_json(self, doc: Any) -> Completion:
        if not isinstance(doc, dict) or doc.get("error") or not doc.get("choices"):
            raise classify_stream_error(doc if isinstance(doc, dict) else {"error": str(doc)})
        choice = doc["choices"][0]
        msg = choice.get("message") or {}
        return finish_completion(msg.get("content") or "", choice.get("finish_reason") or "",
                                 doc.get("model"), doc.get("id"), parse_usage(doc.get("usage")),
                                 "json", {})
