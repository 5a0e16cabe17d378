"""Gemini's native API: ``{base}/models/{model}:streamGenerateContent?alt=sse`` (and
``:generateContent`` with ``--no-stream``), request body and chunk folding.

Folding follows docs/protocol.md §15: every SSE event is a whole
``GenerateContentResponse``; the stream has no terminator and ends at EOF, complete
once a candidate carried a ``finishReason``. Text parts fold into the caption, parts
marked ``thought`` stay out (counted for the reasoning rule), a ``functionCall`` part's
``args`` are the caption of a ``--tool-schema`` run, the last ``usageMetadata`` wins
(``thoughtsTokenCount`` is billed output beside ``candidatesTokenCount``). A prompt the
API blocks (``promptFeedback.blockReason``) is a refusal. A non-streamed answer is one
such document, folded by the same code.
"""

from __future__ import annotations

import json
import mimetypes
from typing import Any
from urllib.parse import quote, urlsplit

from ...errors import Retryable, RowFailed, bad_response, classify_stream_error
from ...records import ApiRequest, Completion, ManifestRow, PreparedImage, Usage
from ...validate import as_count
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

# --reasoning-effort → thinkingConfig.thinkingBudget (docs/protocol.md §14.3); 0 turns
# thinking off where the model allows it.
THINKING_BUDGET = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576}


def parse_usage(u: Any) -> Usage | None:
    """``usageMetadata``: the prompt, and the output as candidates + thoughts (both are
    billed as output; docs/protocol.md §15.4)."""
    if not isinstance(u, dict):
        return None
    candidates, thoughts = as_count(u.get("candidatesTokenCount")), as_count(
        u.get("thoughtsTokenCount"))
    output = None if candidates is None and thoughts is None else (candidates or 0) + (
        thoughts or 0)
    return usage_counts(u.get("promptTokenCount"), output, u.get("totalTokenCount"),
                        u.get("cachedContentTokenCount"), thoughts)


class GeminiStreamState:
    """Folds the ``GenerateContentResponse`` chunks of one attempt (or one JSON body)."""

    __slots__ = ("first_content_at", "model", "parts", "quirks", "response_id", "finish_raw",
                 "usage", "tool_args", "refusal", "reasoning_chars")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_raw = ""
        self.usage: Any = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.first_content_at: float | None = None
        self.quirks: dict[str, int] = {}
        self.tool_args: str | None = None
        self.refusal = ""
        self.reasoning_chars = 0

    def on_event(self, event: Event, now: float) -> bool:
        if event.event == "ping" or event.data[:6] == "[DONE]":
            return False
        doc = try_json(event.data)
        if isinstance(doc, list) and len(doc) == 1:  # errors come wrapped in a list
            doc = doc[0]
        if not isinstance(doc, dict):
            raise Retryable(f"invalid JSON in stream: {event.data[:80]!r}", "stream_broken",
                            http_status=200)
        self.fold(doc, now)
        return False  # no terminator: the stream ends at EOF (§15.2)

    def fold(self, doc: dict[str, Any], now: float) -> None:
        if doc.get("error"):
            raise classify_stream_error(doc)
        self.model = label(doc.get("modelVersion"), {}, "model") or self.model
        self.response_id = label(doc.get("responseId"), self.quirks, "id") or self.response_id
        if isinstance(doc.get("usageMetadata"), dict):
            self.usage = doc["usageMetadata"]
        feedback = obj(doc.get("promptFeedback"), "promptFeedback")
        blocked = reason(feedback.get("blockReason"), "promptFeedback.blockReason")
        if blocked:
            self.finish_raw, self.refusal = blocked, f"the prompt was blocked ({blocked})"
        candidates = doc.get("candidates")
        if candidates is None:
            return
        if not isinstance(candidates, list):
            raise bad_response(f"candidates is {type(candidates).__name__}, not a list")
        for position, candidate in enumerate(candidates):
            candidate = obj(candidate, "a candidate", required=True)
            index = candidate.get("index", position)
            if index not in (0, None):
                self.quirks["nonzero_index"] = self.quirks.get("nonzero_index", 0) + 1
            self._candidate(candidate, now)

    def _candidate(self, candidate: dict[str, Any], now: float) -> None:
        content = obj(candidate.get("content"), "candidate.content")
        parts = content.get("parts") or []
        if not isinstance(parts, list):
            raise bad_response(f"parts is {type(parts).__name__}, not a list")
        for part in parts:
            self._part(obj(part, "a content part", required=True), now)
        finish = reason(candidate.get("finishReason"), "finishReason")
        if finish and finish != "FINISH_REASON_UNSPECIFIED":
            self.finish_raw = finish

    def _part(self, part: dict[str, Any], now: float) -> None:
        if part.get("thought") is True:  # thinking, never part of the caption
            text = part.get("text")
            self.reasoning_chars += len(text) if isinstance(text, str) else 0
            return
        call = part.get("functionCall")
        if call is not None and self.tool_args is None:
            args = obj(obj(call, "functionCall").get("args"), "functionCall.args")
            self.tool_args = json.dumps(args, ensure_ascii=False)
        text = content_text(part.get("text"), "part.text")
        if (text or call is not None) and self.first_content_at is None:
            self.first_content_at = now
        if text:
            self.parts.append(text)

    def finish(self, terminal: str = "eof_after_finish") -> Completion:
        if not self.finish_raw:
            raise Retryable("stream ended without finishReason", "stream_broken",
                            http_status=200)
        return finish_completion("".join(self.parts), self.finish_raw, self.model,
                                 self.response_id, parse_usage(self.usage), terminal,
                                 self.quirks,
                                 Extras(self.tool_args, self.refusal, self.reasoning_chars))


class Gemini:
    """Gemini's native generateContent protocol."""

    name = "gemini"
    path = "/models/{model}:streamGenerateContent"
    key_env: tuple[str, ...] = ("CAPTION_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY")
    _UNSUPPORTED = ("logit_bias", "user", "detail")

    def check(self, spec: RequestSpec) -> None:
        refuse_options(self.name, spec.options, self._UNSUPPORTED,
                       "Gemini's API has no such option")
        if spec.options.n != 1:
            raise unavailable(self.name, "n", "one candidate per request is folded")

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-goog-api-key": api_key} if api_key else {}

    def build_request(self, row: ManifestRow, image: PreparedImage,
                      spec: RequestSpec) -> ApiRequest:
        model = quote(spec.model.removeprefix("models/"), safe="-._~")
        method = "streamGenerateContent?alt=sse" if spec.stream else "generateContent"
        body: dict[str, Any] = {"contents": [{"role": "user", "parts": [
            image_part(image), {"text": prompt_of(row)}]}]}
        if spec.follow_up:  # docs/protocol.md §19.5: the model's turn is role "model"
            body["contents"] += [{"role": "model", "parts": [{"text": spec.follow_up.answer}]},
                                 {"role": "user",
                                  "parts": [{"text": spec.follow_up.instruction}]}]
        if spec.system:
            body["systemInstruction"] = {"parts": [{"text": spec.system}]}
        config = {"maxOutputTokens": spec.max_tokens, **self.config_fields(spec.options)}
        body["generationConfig"] = config
        if spec.options.tool_schema is not None:
            fn = tool_function(spec.options.tool_schema)
            body["tools"] = [{"functionDeclarations": [
                {"name": fn["name"], "description": fn["description"],
                 "parametersJsonSchema": fn["parameters"]}]}]
            body["toolConfig"] = {"functionCallingConfig": {
                "mode": "ANY", "allowedFunctionNames": [TOOL_NAME]}}
        return encode_request(f"/models/{model}:{method}", body, row, image, spec)

    @staticmethod
    def config_fields(o: RequestOptions) -> dict[str, Any]:
        names = {"temperature": "temperature", "top_p": "topP", "seed": "seed",
                 "presence_penalty": "presencePenalty",
                 "frequency_penalty": "frequencyPenalty"}
        config = {names[k]: v for k, v in o.given(*names).items()}
        if o.stop:
            config["stopSequences"] = list(o.stop)
        if o.response_format is not None:
            config["responseMimeType"] = "application/json"
            schema = o.response_format.get("json_schema", {}).get("schema")
            if schema is not None:
                config["responseJsonSchema"] = schema
        if o.reasoning_effort is not None:
            config["thinkingConfig"] = {"thinkingBudget": THINKING_BUDGET[o.reasoning_effort]}
        return config

    def new_state(self, n: int = 1) -> GeminiStreamState:
        return GeminiStreamState()

    def from_json(self, doc: Any) -> Completion:
        if isinstance(doc, list) and len(doc) == 1:
            doc = doc[0]
        if not isinstance(doc, dict) or doc.get("error") or not (
                "candidates" in doc or "promptFeedback" in doc):
            raise classify_stream_error(doc if isinstance(doc, dict) else {"error": str(doc)})
        state = GeminiStreamState()
        state.fold(doc, 0.0)
        return state.finish("json")


def image_part(image: PreparedImage) -> dict[str, Any]:
    """A data: URI becomes ``inline_data`` (the payload without its prefix); a URL is
    ``file_data`` for Gemini to fetch, typed by its extension (docs/protocol.md §15.1)."""
    url = image.url
    if url[:5].lower() == "data:":
        header, sep, payload = url[5:].partition(",")
        params = header.split(";")
        if not sep or "base64" not in params[1:]:
            raise RowFailed("image data URI is not base64-encoded", "bad_image")
        return {"inline_data": {"mime_type": params[0] or image.mime or "image/jpeg",
                                "data": payload}}
    mime = image.mime or mimetypes.guess_type(urlsplit(url).path)[0] or "image/jpeg"
    return {"file_data": {"mime_type": mime, "file_uri": url}}
