"""The two wire dialects of the local gateway SIMULATOR: OpenAI Chat Completions and Anthropic.

Owns everything that differs between the protocols: reading a request body into a
`Job` (field checks, per-protocol defaults), framing a streamed answer as
`chat.completion.chunk` events or named Messages events (docs/protocol.md §2.3, §3.2)
and the equivalent non-streamed body, the stream endings the faults use, error bodies
in either shape (the errors themselves: `simulator.errors`) and the
`x-ratelimit-*` / `anthropic-ratelimit-*` headers (docs/protocol.md §5.2, §5.3).

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
The request flow that uses a `Dialect` lives in `simulator.app`.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from .captions import (
    BadRequest,
    Prompt,
    parse_anthropic_messages,
    parse_openai_messages,
)
from .errors import ApiError, retry_after_header
from .flex import served_tier
from .limits import RateLimits, go_duration

if TYPE_CHECKING:
    from .app import SimConfig

__all__ = [
    "ANTHROPIC", "CLOSE", "DIALECTS", "OPENAI", "STALL", "AnthropicDialect", "Choice",
    "Dialect", "Frame", "Job", "OpenAIDialect", "Plan", "compact_json",
]  # fmt: skip

_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Frame:
    """One SSE event to write, or an action: "close" cuts the connection, "stall" goes silent."""

    data: bytes = b""
    token: bool = False  # a content piece: paced at tokens_per_second
    action: str = ""


CLOSE, STALL = Frame(action="close"), Frame(action="stall")


@dataclass(frozen=True)
class Plan:
    """A complete, well-formed response stream; faults cut or replace parts of it."""

    head: tuple[Frame, ...]
    tokens: tuple[Frame, ...]
    tail: tuple[Frame, ...]


@dataclass(frozen=True)
class Job:
    """A parsed request: what to answer and how to frame it."""

    request_id: str
    model: str
    prompt: Prompt
    stream: bool
    include_usage: bool
    max_tokens: int
    n: int
    response_id: str
    created: int
    json_mode: bool = False  # response_format asked for JSON: answer {"caption": ...}
    service_tier: str | None = None  # OpenAI: the tier answers say they were served on


@dataclass(frozen=True)
class Choice:
    index: int
    pieces: tuple[str, ...]
    finish: str  # "stop" | "length" (Anthropic: end_turn | max_tokens)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def compact_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _sse(obj: Any, event: str | None = None) -> Frame:
    prefix = f"event: {event}\n" if event else ""
    return Frame(f"{prefix}data: {compact_json(obj)}\n\n".encode())


class Dialect(Protocol):
    """What differs between the two protocols; the request flow itself is shared."""

    request_id_header: str

    def api_key(self, request: web.Request) -> str | None: ...
    async def parse(self, body: dict[str, Any], config: SimConfig, request_id: str) -> Job: ...
    def error(self, err: ApiError, request_id: str) -> web.Response: ...
    def plan(self, job: Job, choices: tuple[Choice, ...]) -> Plan: ...
    def body(self, job: Job, choices: tuple[Choice, ...], finished: bool) -> dict[str, Any]: ...
    def endings(self) -> dict[str, tuple[Frame, ...]]: ...
    def limit_headers(self, limits: RateLimits) -> dict[str, str]: ...


def _interleave(choices: tuple[Choice, ...]) -> list[tuple[int, str]]:
    """Round-robin the choices' pieces, as a server decoding n sequences in a batch would."""
    longest = max((len(c.pieces) for c in choices), default=0)
    return [(c.index, c.pieces[k]) for k in range(longest) for c in choices if k < len(c.pieces)]


def _token(frame: Frame) -> Frame:
    return Frame(frame.data, token=True)


class OpenAIDialect:
    """Chat Completions: `chat.completion.chunk` events ending in `data: [DONE]` (ref. 2)."""

    request_id_header = "x-request-id"

    def api_key(self, request: web.Request) -> str | None:
        return _bearer(request)

    async def parse(self, body: dict[str, Any], config: SimConfig, request_id: str) -> Job:
        model, stream = _model(body), _flag(body, "stream")
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
        # max_completion_tokens is the newer name; either is accepted.
        max_tokens = _positive_int(body, "max_completion_tokens")
        max_tokens = max_tokens or _positive_int(body, "max_tokens")
        n = _positive_int(body, "n", high=128) or 1
        # Pillow work runs off the event loop so a benchmark's streams keep flowing.
        prompt = await asyncio.to_thread(parse_openai_messages, body.get("messages"))
        response_id = f"chatcmpl-{secrets.token_hex(12)}"
        limit = max_tokens or config.max_tokens_default
        created = int(time.time())
        fmt = body.get("response_format")
        json_mode = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
        return Job(request_id, model, prompt, stream, include_usage, limit, n, response_id,
                   created, json_mode, served_tier(body.get("service_tier")))

    def error(self, err: ApiError, request_id: str) -> web.Response:
        detail: dict[str, str | None] = {"message": err.message, "type": err.openai_type}
        detail |= {"param": err.param, "code": err.code}
        headers = {self.request_id_header: request_id}
        if err.retry_after is not None:
            headers["Retry-After"] = retry_after_header(err.retry_after)
        return web.json_response({"error": detail}, status=err.status, headers=headers)

    def plan(self, job: Job, choices: tuple[Choice, ...]) -> Plan:
        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> Frame:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._chunk(job, [choice])

        head = tuple(chunk(c.index, {"role": "assistant", "content": ""}) for c in choices)
        tokens = tuple(_token(chunk(i, {"content": piece})) for i, piece in _interleave(choices))
        tail = [chunk(c.index, {}, c.finish) for c in choices]
        if job.include_usage:
            tail.append(self._chunk(job, [], self._usage(job, choices)))
        return Plan(head, tokens, (*tail, Frame(_DONE)))

    def endings(self) -> dict[str, tuple[Frame, ...]]:
        message = "The server had an error while processing your request."
        error = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return {
            "error_event": (_sse(error), Frame(_DONE)),
            "bad_json": (Frame(b"data: {not json\n\n"), Frame(_DONE)),
            "done_no_finish": (Frame(_DONE),),
        }

    def body(self, job: Job, choices: tuple[Choice, ...], finished: bool) -> dict[str, Any]:
        def choice(c: Choice) -> dict[str, Any]:
            message = {"role": "assistant", "content": c.text, "refusal": None}
            finish = c.finish if finished else None
            return {"index": c.index, "message": message, "logprobs": None, "finish_reason": finish}

        return {
            "id": job.response_id, "object": "chat.completion", "created": job.created,
            "model": job.model, "system_fingerprint": "fp_simulator",
            "choices": [choice(c) for c in choices], "usage": self._usage(job, choices),
            **({"service_tier": job.service_tier} if job.service_tier else {}),
        }  # fmt: skip

    def limit_headers(self, limits: RateLimits) -> dict[str, str]:
        headers = {}
        for kind, bucket in limits.buckets.items():
            headers[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.remaining())))
            headers[f"x-ratelimit-reset-{kind}"] = go_duration(bucket.reset_seconds())
        return headers

    @staticmethod
    def _chunk(job: Job, choices: list[Any], usage: dict[str, Any] | None = None) -> Frame:
        obj: dict[str, Any] = {
            "id": job.response_id, "object": "chat.completion.chunk", "created": job.created,
            "model": job.model, "system_fingerprint": "fp_simulator", "choices": choices,
        }  # fmt: skip
        if job.include_usage:  # OpenAI sends usage: null on every chunk but the last
            obj["usage"] = usage
        if job.service_tier:
            obj["service_tier"] = job.service_tier
        return _sse(obj)

    @staticmethod
    def _usage(job: Job, choices: tuple[Choice, ...]) -> dict[str, Any]:
        prompt, completion = job.prompt.tokens, sum(len(c.pieces) for c in choices)
        return {
            "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }  # fmt: skip


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


class AnthropicDialect:
    """Messages API: named events from message_start to message_stop (ref. 3)."""

    request_id_header = "request-id"

    def api_key(self, request: web.Request) -> str | None:
        return request.headers.get("x-api-key") or _bearer(request)

    async def parse(self, body: dict[str, Any], config: SimConfig, request_id: str) -> Job:
        model, stream = _model(body), _flag(body, "stream")
        max_tokens = _positive_int(body, "max_tokens")
        if max_tokens is None:  # required by the real API; a client that omits it is buggy
            raise BadRequest("max_tokens: Field required", "max_tokens")
        system, messages = body.get("system"), body.get("messages")
        prompt = await asyncio.to_thread(parse_anthropic_messages, system, messages)
        response_id = f"msg_{secrets.token_hex(12)}"
        created = int(time.time())
        return Job(request_id, model, prompt, stream, True, max_tokens, 1, response_id, created)

    def error(self, err: ApiError, request_id: str) -> web.Response:
        detail = {"type": err.anthropic_type, "message": err.message}
        headers = {self.request_id_header: request_id}
        if err.retry_after is not None:  # Anthropic sends whole seconds
            headers["retry-after"] = retry_after_header(err.retry_after, whole_seconds=True)
        if err.status == 400:
            headers["x-should-retry"] = "false"
        body = {"type": "error", "error": detail, "request_id": request_id}
        return web.json_response(body, status=err.status, headers=headers)

    def plan(self, job: Job, choices: tuple[Choice, ...]) -> Plan:
        choice = choices[0]
        usage = {"input_tokens": job.prompt.tokens, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0, "output_tokens": 1}  # fmt: skip
        message: dict[str, Any] = {
                   "id": job.response_id, "type": "message", "role": "assistant", "content": [],
                   "model": job.model, "stop_reason": None, "stop_sequence": None,
                   "usage": usage}  # fmt: skip
        block = {"type": "text", "text": ""}
        head = (
            _event("message_start", message=message),
            _event("content_block_start", index=0, content_block=block),
            _event("ping"),
        )
        tokens = tuple(_token(self._delta(piece)) for piece in choice.pieces)
        delta = {"stop_reason": _STOP_REASONS[choice.finish], "stop_sequence": None}
        output = {"output_tokens": max(1, len(choice.pieces))}
        tail = (
            _event("content_block_stop", index=0),
            _event("message_delta", delta=delta, usage=output),
            _event("message_stop"),
        )
        return Plan(head, tokens, tail)

    def endings(self) -> dict[str, tuple[Frame, ...]]:
        overloaded = {"type": "overloaded_error", "message": "Overloaded"}
        return {
            "error_event": (_event("error", error=overloaded),),
            "bad_json": (Frame(b"event: content_block_delta\ndata: {not json\n\n"),),
            "done_no_finish": (_event("content_block_stop", index=0), _event("message_stop")),
        }

    def body(self, job: Job, choices: tuple[Choice, ...], finished: bool) -> dict[str, Any]:
        choice = choices[0]
        usage = {"input_tokens": job.prompt.tokens, "output_tokens": max(1, len(choice.pieces))}
        return {
            "id": job.response_id, "type": "message", "role": "assistant", "model": job.model,
            "content": [{"type": "text", "text": choice.text}],
            "stop_reason": _STOP_REASONS[choice.finish] if finished else None,
            "stop_sequence": None, "usage": usage,
        }  # fmt: skip

    def limit_headers(self, limits: RateLimits) -> dict[str, str]:
        headers, now = {}, datetime.now(UTC)
        for kind, bucket in limits.buckets.items():
            reset = now + timedelta(seconds=math.ceil(bucket.reset_seconds()))
            prefix = f"anthropic-ratelimit-{kind}"
            headers[f"{prefix}-limit"] = str(bucket.limit)
            headers[f"{prefix}-remaining"] = str(max(0, math.floor(bucket.remaining())))
            headers[f"{prefix}-reset"] = reset.strftime("%Y-%m-%dT%H:%M:%SZ")
        return headers

    @staticmethod
    def _delta(piece: str) -> Frame:
        return _event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})


def _event(name: str, **fields: Any) -> Frame:
    """An Anthropic event: the SSE `event:` name repeats the JSON `type`."""
    return _sse({"type": name, **fields}, name)


OPENAI, ANTHROPIC = OpenAIDialect(), AnthropicDialect()
DIALECTS: dict[str, Dialect] = {"/v1/chat/completions": OPENAI, "/v1/messages": ANTHROPIC}


# ---------------------------------------------------------------- request fields


def _bearer(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    return model


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"Invalid type for '{name}': expected a boolean", name)
    return bool(value)


def _positive_int(body: dict[str, Any], name: str, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if not valid or (high is not None and value > high):
        bound = f" and <= {high}" if high else ""
        raise BadRequest(f"Invalid value for '{name}': expected an integer >= 1{bound}", name)
    return int(value)
