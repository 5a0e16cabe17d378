"""The shared framing of the local gateway SIMULATOR's dialects, and OpenAI Chat Completions.

Owns what every dialect uses: a parsed request (`Job`), what the model answers
(`Choice`), the frames of a stream (`Frame`, `Plan`), the `Dialect` protocol and the
request-field readers; and the chat dialect itself: `chat.completion.chunk` events
ending in `data: [DONE]` and the equivalent non-streamed body (docs/protocol.md §2.3),
its error bodies (the errors themselves: `simulator.errors`) and the `x-ratelimit-*`
headers (§5.2). The other dialects are modules of their own (`anthropic`, `responses`,
`gemini`).

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
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from .behaviour import TOOL_NAME, with_traits
from .captions import (
    BadRequest,
    Prompt,
    parse_openai_messages,
)
from .errors import ApiError, retry_after_header
from .flex import served_tier
from .limits import RateLimits, go_duration

if TYPE_CHECKING:
    from .app import SimConfig

__all__ = [
    "CLOSE", "OPENAI", "STALL", "Choice", "Dialect", "Frame", "Job", "OpenAIDialect", "Plan",
    "bearer", "compact_json", "flag", "model_of", "positive_int", "sse_frame", "token_frame",
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
    tool: bool = False  # the request offered a function: answer with a call of it
    thoughts: int = 0  # reasoning tokens the simulated model spends before answering
    refuse: bool = False  # the prompt asked for a refusal (simulator trigger)
    gap: bool = False  # Responses: skip a sequence number (simulator trigger)
    service_tier: str | None = None  # OpenAI: the tier answers say they were served on


@dataclass(frozen=True)
class Choice:
    index: int
    pieces: tuple[str, ...]
    finish: str  # "stop" | "length" (Anthropic: end_turn | max_tokens)
    thoughts: tuple[str, ...] = ()  # reasoning pieces, streamed before the answer

    @property
    def tokens(self) -> int:
        return len(self.thoughts) + len(self.pieces)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def compact_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse_frame(obj: Any, event: str | None = None) -> Frame:
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


def token_frame(frame: Frame) -> Frame:
    return Frame(frame.data, token=True)


class OpenAIDialect:
    """Chat Completions: `chat.completion.chunk` events ending in `data: [DONE]` (ref. 2)."""

    request_id_header = "x-request-id"

    def api_key(self, request: web.Request) -> str | None:
        return bearer(request)

    async def parse(self, body: dict[str, Any], config: SimConfig, request_id: str) -> Job:
        model, stream = model_of(body), flag(body, "stream")
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
        # max_completion_tokens is the newer name; either is accepted.
        max_tokens = positive_int(body, "max_completion_tokens")
        max_tokens = max_tokens or positive_int(body, "max_tokens")
        n = positive_int(body, "n", high=128) or 1
        # Pillow work runs off the event loop so a benchmark's streams keep flowing.
        prompt = await asyncio.to_thread(parse_openai_messages, body.get("messages"))
        response_id = f"chatcmpl-{secrets.token_hex(12)}"
        limit = max_tokens or config.max_tokens_default
        created = int(time.time())
        fmt = body.get("response_format")
        json_mode = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
        job = Job(request_id, model, prompt, stream, include_usage, limit, n, response_id,
                  created, json_mode, service_tier=served_tier(body.get("service_tier")))
        effort = body.get("reasoning_effort")
        return with_traits(job, effort if isinstance(effort, str) else None,
                           bool(body.get("tools")))

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
        thoughts = tuple(token_frame(chunk(c.index, {"reasoning_content": piece}))
                         for c in choices for piece in c.thoughts)
        tokens = tuple(token_frame(chunk(i, self._delta(job, k, piece)))
                       for k, (i, piece) in enumerate(_interleave(choices)))
        tail = [chunk(c.index, {}, self._finish(job, c.finish)) for c in choices]
        if job.include_usage:
            tail.append(self._chunk(job, [], self._usage(job, choices)))
        return Plan(head + thoughts, tokens, (*tail, Frame(_DONE)))

    @staticmethod
    def _delta(job: Job, k: int, piece: str) -> dict[str, Any]:
        """A content piece: text, a refusal's text, or a piece of the call's arguments."""
        if job.refuse:
            return {"refusal": piece}
        if not job.tool:
            return {"content": piece}
        call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
        if k == 0:  # the first piece names the call, as OpenAI does
            call |= {"id": f"call_{job.response_id[-8:]}", "type": "function"}
            call["function"]["name"] = TOOL_NAME
        return {"tool_calls": [call]}

    @staticmethod
    def _finish(job: Job, finish: str) -> str:
        return "tool_calls" if job.tool and finish == "stop" else finish

    def endings(self) -> dict[str, tuple[Frame, ...]]:
        message = "The server had an error while processing your request."
        error = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return {
            "error_event": (sse_frame(error), Frame(_DONE)),
            "bad_json": (Frame(b"data: {not json\n\n"), Frame(_DONE)),
            "done_no_finish": (Frame(_DONE),),
        }

    def body(self, job: Job, choices: tuple[Choice, ...], finished: bool) -> dict[str, Any]:
        def choice(c: Choice) -> dict[str, Any]:
            message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
            if job.refuse:
                message |= {"content": None, "refusal": c.text}
            elif job.tool:
                call = {"name": TOOL_NAME, "arguments": c.text}
                message |= {"content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": call}]}
            if c.thoughts:
                message["reasoning_content"] = "".join(c.thoughts)
            finish = self._finish(job, c.finish) if finished else None
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
        return sse_frame(obj)

    @staticmethod
    def _usage(job: Job, choices: tuple[Choice, ...]) -> dict[str, Any]:
        prompt, completion = job.prompt.tokens, sum(c.tokens for c in choices)
        reasoning = sum(len(c.thoughts) for c in choices)
        return {
            "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }  # fmt: skip


OPENAI = OpenAIDialect()


# ---------------------------------------------------------------- request fields


def bearer(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    return model


def flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"Invalid type for '{name}': expected a boolean", name)
    return bool(value)


def positive_int(body: dict[str, Any], name: str, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if not valid or (high is not None and value > high):
        bound = f" and <= {high}" if high else ""
        raise BadRequest(f"Invalid value for '{name}': expected an integer >= 1{bound}", name)
    return int(value)
