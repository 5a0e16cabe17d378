"""Gemini's native dialect for the local gateway SIMULATOR.

``POST /v1beta/models/{model}:streamGenerateContent?alt=sse`` streams
``GenerateContentResponse`` chunks as bare ``data:`` events and simply ends (no
terminator); ``:generateContent`` answers one such document (docs/protocol.md §15). The
key comes in ``x-goog-api-key`` (or ``?key=``); errors are ``{"error": {"code",
"message", "status"}}``, a wrong key a 400 with reason ``API_KEY_INVALID`` as the real
API answers it. A thinking model's reasoning comes as parts marked ``thought``; a
function offered is answered by one ``functionCall`` part with its ``args`` whole (or
``MALFORMED_FUNCTION_CALL`` when max_tokens cut it); a refusal is ``finishReason:
SAFETY``; a cut caption ``MAX_TOKENS``. Gemini sends no rate-limit headers.

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .behaviour import TOOL_NAME, with_traits
from .captions import BadRequest, ImageInfo, InvalidImage, Prompt, inspect_image, url_image
from .errors import ApiError
from .limits import RateLimits
from .wire import Choice, Frame, Job, Plan, compact_json

if TYPE_CHECKING:
    from .app import SimConfig

__all__ = ["GeminiDialect", "parse_contents"]

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
           500: "INTERNAL", 503: "UNAVAILABLE", 529: "UNAVAILABLE"}


def _get(d: dict[str, Any], camel: str, snake: str) -> Any:
    """Gemini's REST API takes both spellings of every field."""
    return d.get(camel, d.get(snake))


def parse_contents(system: Any, contents: Any) -> Prompt:
    texts: list[str] = []
    if isinstance(system, dict):
        texts += [p["text"] for p in system.get("parts") or [] if isinstance(p, dict)
                  and isinstance(p.get("text"), str)]
    images: list[ImageInfo] = []
    if not isinstance(contents, list) or not contents:
        raise BadRequest("contents must be a non-empty array", "contents")
    for position, content in enumerate(contents):
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list):
            raise BadRequest(f"contents[{position}].parts must be an array")
        for part in parts:
            _part(part if isinstance(part, dict) else {}, texts, images, position)
    answered = any(isinstance(c, dict) and c.get("role") == "model" for c in contents)
    return Prompt(" ".join(texts), tuple(images), len(contents) + (1 if system else 0),
                  answered)


def _part(part: dict[str, Any], texts: list[str], images: list[ImageInfo], pos: int) -> None:
    inline, file = _get(part, "inlineData", "inline_data"), _get(part, "fileData", "file_data")
    if isinstance(part.get("text"), str):
        texts.append(part["text"])
    elif isinstance(inline, dict):
        try:
            data = base64.b64decode(str(inline.get("data", "")), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImage(f"contents[{pos}]: Base64 decoding failed") from None
        images.append(inspect_image(data))
    elif isinstance(file, dict) and isinstance(_get(file, "fileUri", "file_uri"), str):
        images.append(url_image(_get(file, "fileUri", "file_uri")))
    else:
        raise BadRequest(f"contents[{pos}].parts: unsupported part {sorted(part)!r}")


class GeminiDialect:
    """One request's dialect: the model and the method come from the URL path."""

    request_id_header = "x-request-id"

    def __init__(self, model: str, stream: bool) -> None:
        self.model, self.stream = model, stream

    def api_key(self, request: web.Request) -> str | None:
        return request.headers.get("x-goog-api-key") or request.query.get("key")

    async def parse(self, body: dict[str, Any], config: SimConfig, request_id: str) -> Job:
        system = _get(body, "systemInstruction", "system_instruction")
        prompt = await asyncio.to_thread(parse_contents, system, body.get("contents"))
        gen = _get(body, "generationConfig", "generation_config")
        gen = gen if isinstance(gen, dict) else {}
        limit = _get(gen, "maxOutputTokens", "max_output_tokens")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 1):
            raise BadRequest("generationConfig.maxOutputTokens must be a positive integer")
        json_mode = _get(gen, "responseMimeType", "response_mime_type") == "application/json"
        job = Job(request_id, self.model, prompt, self.stream, True,
                  limit or config.max_tokens_default, 1, secrets.token_hex(8),
                  int(time.time()), json_mode)
        thinking = _get(gen, "thinkingConfig", "thinking_config")
        budget = _get(thinking, "thinkingBudget", "thinking_budget") \
            if isinstance(thinking, dict) else None
        return with_traits(job, None, bool(body.get("tools")),
                           budget if isinstance(budget, int) and budget >= 0 else None)

    def error(self, err: ApiError, request_id: str) -> web.Response:
        status, detail = err.status, {"code": err.status, "message": err.message}
        if err.code == "invalid_api_key":  # Gemini says 400, not 401 (§15.5)
            status, detail = 400, {"code": 400, "message": "API key not valid. Please pass a "
                                   "valid API key.", "details": [{"reason": "API_KEY_INVALID"}]}
        detail["status"] = _STATUS.get(status, "UNKNOWN")
        return web.json_response({"error": detail}, status=status,
                                 headers={self.request_id_header: request_id})

    def limit_headers(self, limits: RateLimits) -> dict[str, str]:
        return {}

    def plan(self, job: Job, choices: tuple[Choice, ...]) -> Plan:
        c = choices[0]
        head = tuple(Frame(self._chunk(job, [{"text": p, "thought": True}]), token=True)
                     for p in c.thoughts)
        tokens: tuple[Frame, ...]
        if job.tool and not job.refuse:  # args come whole, in one part
            tokens = (Frame(self._chunk(job, self._parts(job, c)), token=True),) \
                if c.finish == "stop" else ()
        elif job.refuse:
            tokens = ()
        else:
            tokens = tuple(Frame(self._chunk(job, [{"text": p}]), token=True)
                           for p in c.pieces)
        tail = (Frame(self._chunk(job, [], self._finish(job, c), self._usage(job, c))),)
        return Plan(head, tokens, tail)

    def body(self, job: Job, choices: tuple[Choice, ...], finished: bool) -> dict[str, Any]:
        c = choices[0]
        parts = [{"text": "".join(c.thoughts), "thought": True}] if c.thoughts else []
        parts += self._parts(job, c)
        return self._doc(job, parts, self._finish(job, c) if finished else None,
                         self._usage(job, c))

    def endings(self) -> dict[str, tuple[Frame, ...]]:
        error = {"error": {"code": 500, "message": "An internal error has occurred.",
                           "status": "INTERNAL"}}
        return {"error_event": (Frame(f"data: {compact_json(error)}\n\n".encode()),),
                "bad_json": (Frame(b"data: {not json\n\n"),),
                "done_no_finish": ()}

    @staticmethod
    def _parts(job: Job, c: Choice) -> list[dict[str, Any]]:
        if job.refuse:
            return []
        if job.tool:
            if c.finish != "stop":
                return []
            return [{"functionCall": {"name": TOOL_NAME, "args": json.loads(c.text)}}]
        return [{"text": c.text}]

    @staticmethod
    def _finish(job: Job, c: Choice) -> str:
        if job.refuse:
            return "SAFETY"
        if c.finish == "length":
            return "MALFORMED_FUNCTION_CALL" if job.tool else "MAX_TOKENS"
        return "STOP"

    @staticmethod
    def _usage(job: Job, c: Choice) -> dict[str, Any]:
        usage = {"promptTokenCount": job.prompt.tokens, "candidatesTokenCount": len(c.pieces),
                 "totalTokenCount": job.prompt.tokens + c.tokens}
        if c.thoughts:
            usage["thoughtsTokenCount"] = len(c.thoughts)
        return usage

    def _chunk(self, job: Job, parts: list[dict[str, Any]], finish: str | None = None,
               usage: dict[str, Any] | None = None) -> bytes:
        return f"data: {compact_json(self._doc(job, parts, finish, usage))}\n\n".encode()

    @staticmethod
    def _doc(job: Job, parts: list[dict[str, Any]], finish: str | None,
             usage: dict[str, Any] | None) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = finish
        doc: dict[str, Any] = {"candidates": [candidate], "modelVersion": job.model,
                               "responseId": job.response_id}
        if usage is not None:
            doc["usageMetadata"] = usage
        return doc
