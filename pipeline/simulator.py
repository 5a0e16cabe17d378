"""Local OpenAI/Anthropic-compatible gateway SIMULATOR (no model runs) for demo, tests, benchmarks.

Owns the HTTP side of the simulator: the routes (`POST /v1/chat/completions`,
`POST /v1/messages`, `GET /v1/models`, `GET /health`), the streaming wire formats of both
protocols (protocol-reference 2.3 and 3.2), injected faults, server-side rate limits kept
as continuously refilled token buckets with `x-ratelimit-*` / `anthropic-ratelimit-*`
headers (reference 5.2, 5.3), counters for benchmarks (`app[STATS]`) and a small CLI.
What the simulated model "says" and what a prompt costs live in `pipeline.sim_captions`.

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from aiohttp import web

from pipeline.sim_captions import (
    BadRequest,
    Prompt,
    caption_for,
    parse_anthropic_messages,
    parse_openai_messages,
    split_tokens,
)

__all__ = [
    "CONFIG", "FAULT_MODES", "LIMITS", "STATS", "RateLimits", "SimConfig", "SimStats",
    "TokenBucket", "build_app", "go_duration", "main", "start",
]  # fmt: skip

FAULT_MODES = (
    "429", "500", "502html", "503", "529",
    "truncate", "error_event", "stall", "bad_json", "done_no_finish",
)  # fmt: skip
_HTTP_FAULTS = frozenset({"429", "500", "502html", "503", "529"})
STALL_SECONDS = 3600.0
INVALID_KEY = "sk-invalid"
MAX_BODY_BYTES = 32 * 1024 * 1024  # the Messages API request limit (reference 6.1)
_DONE = b"data: [DONE]\n\n"
_HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class SimConfig:
    """Scenario knobs. Invalid values raise ValueError (the CLI turns that into exit 2)."""

    latency: float = 0.05  # seconds before the first byte (time to first token)
    tokens_per_second: float = 200.0  # streaming rate; 0 or inf = as fast as possible
    fail_rate: float = 0.0  # fraction of requests that get an injected fault
    fail_modes: tuple[str, ...] = ("429", "500", "529", "truncate", "error_event")
    seed: int = 0
    rpm: int | None = None  # server-side limits (token buckets, continuously refilled)
    tpm: int | None = None
    window: float = 60.0  # the limits are per `window` seconds
    rate_limit_headers: bool = True  # send x-ratelimit-* headers
    max_tokens_default: int = 300

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))


def _config_problems(c: SimConfig) -> list[str]:
    checks = {
        "latency must be a finite number >= 0": math.isfinite(c.latency) and c.latency >= 0,
        "tokens_per_second must be >= 0": c.tokens_per_second >= 0,  # False for NaN too
        "fail_rate must be between 0 and 1": 0.0 <= c.fail_rate <= 1.0,
        f"fail_modes must be among {','.join(FAULT_MODES)}": set(c.fail_modes) <= set(FAULT_MODES)
        and (bool(c.fail_modes) or c.fail_rate == 0),
        "rpm must be >= 1": c.rpm is None or c.rpm >= 1,
        "tpm must be >= 1": c.tpm is None or c.tpm >= 1,
        "window must be a finite number > 0": math.isfinite(c.window) and c.window > 0,
        "max_tokens_default must be >= 1": c.max_tokens_default >= 1,
    }
    return [message for message, ok in checks.items() if not ok]


@dataclass
class SimStats:
    """Counters for benchmarks and tests; mutable on purpose, the server updates them."""

    requests_total: int = 0
    requests_429: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    accepted_at: list[float] = field(default_factory=list)  # time.monotonic() at admission
    rejected_at: list[float] = field(default_factory=list)  # time.monotonic() of each 429
    statuses: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)

    @property
    def tokens_served(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# ---------------------------------------------------------------- rate limits


class TokenBucket:
    """Capacity `limit`, refilled continuously at limit/window per second; starts full."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float]) -> None:
        self.limit, self.rate, self._clock = limit, limit / window, clock
        self._level, self._at = float(limit), clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(float(self.limit), self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level()) / self.rate)

    def add(self, amount: float) -> None:
        self._level = min(float(self.limit), self.level() + amount)

    def reset_seconds(self) -> float:
        return (self.limit - self.level()) / self.rate


@dataclass(frozen=True)
class Refusal:
    kind: str  # "requests" | "tokens"
    limit: int
    requested: int
    retry_after: float | None  # None: larger than the whole bucket, waiting never helps


class RateLimits:
    """The rpm and tpm buckets; a request takes from both or from neither."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets: dict[str, TokenBucket] = {}
        if config.rpm:
            self.buckets["requests"] = TokenBucket(config.rpm, config.window, clock)
        if config.tpm:
            self.buckets["tokens"] = TokenBucket(config.tpm, config.window, clock)

    def admit(self, tokens: int) -> Refusal | None:
        need = {"requests": 1, "tokens": tokens}
        tokens_bucket = self.buckets.get("tokens")
        if tokens_bucket and tokens > tokens_bucket.limit:
            return Refusal("tokens", tokens_bucket.limit, tokens, None)
        waits = {kind: bucket.wait_for(need[kind]) for kind, bucket in self.buckets.items()}
        kind = max(waits, key=waits.__getitem__, default=None)
        if kind is not None and waits[kind] > 0:
            return Refusal(kind, self.buckets[kind].limit, need[kind], waits[kind])
        for kind, bucket in self.buckets.items():
            bucket.add(-need[kind])
        return None

    def refund(self, tokens: int) -> None:
        """Reconcile after a request: give back the reserved tokens it did not use."""
        if "tokens" in self.buckets and tokens > 0:
            self.buckets["tokens"].add(tokens)


def go_duration(seconds: float) -> str:
    """Go-style duration as OpenAI sends it: "20ms", "1.5s", "6m0s", "1h2m5s"."""
    if seconds < 0.0005:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text


def _retry_after_text(seconds: float) -> str:
    """Seconds rounded up to 0.1 s, e.g. "1.2" or "2" (the SDKs parse floats)."""
    tenths = max(1, math.ceil(round(seconds * 10, 6)))
    return str(tenths // 10) if tenths % 10 == 0 else f"{tenths / 10:.1f}"


# ---------------------------------------------------------------- errors and wire frames


class ApiError(Exception):
    """An HTTP error answer, described once and rendered in either protocol's shape."""

    def __init__(
        self, status: int, message: str, openai_type: str, anthropic_type: str,
        code: str | None = None, param: str | None = None, retry_after: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.openai_type, self.anthropic_type = openai_type, anthropic_type
        self.retry_after = retry_after


def _fault_error(fault: str) -> ApiError:
    if fault == "429":
        message = "Rate limit reached for requests (simulated fault). Please try again in 1s."
        code = "rate_limit_exceeded"
        return ApiError(429, message, "requests", "rate_limit_error", code, retry_after=1.0)
    if fault == "503":
        message = "The server is overloaded or not ready yet."
        return ApiError(503, message, "server_error", "api_error", retry_after=1.0)
    if fault == "529":
        return ApiError(529, "Overloaded", "overloaded_error", "overloaded_error")
    message = "The server had an error while processing your request. Sorry about that!"
    return ApiError(500, message, "server_error", "api_error")


def _rate_limit_error(refusal: Refusal, model: str) -> ApiError:
    unit = "requests per min (RPM)" if refusal.kind == "requests" else "tokens per min (TPM)"
    counts = f"Limit {refusal.limit}, Requested {refusal.requested}."
    if refusal.retry_after is None:  # a correct client never retries this (reference 5.2)
        message = f"Request too large for {model} on {unit}: {counts}"
        return ApiError(429, message, "tokens", "rate_limit_error", "rate_limit_exceeded")
    wait = _retry_after_text(refusal.retry_after)
    message = f"Rate limit reached for {unit} on {model}: {counts} Please try again in {wait}s."
    return ApiError(
        429, message, refusal.kind, "rate_limit_error", "rate_limit_exceeded",
        retry_after=refusal.retry_after,
    )  # fmt: skip


@dataclass(frozen=True)
class Frame:
    """One SSE event to write, or an action: "close" cuts the connection, "stall" goes silent."""

    data: bytes = b""
    token: bool = False  # a content piece: paced at tokens_per_second
    action: str = ""


_CLOSE, _STALL = Frame(action="close"), Frame(action="stall")


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


@dataclass(frozen=True)
class Choice:
    index: int
    pieces: tuple[str, ...]
    finish: str  # "stop" | "length" (Anthropic: end_turn | max_tokens)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _choices(job: Job, seed: int) -> tuple[Choice, ...]:
    out = []
    for index in range(job.n):
        text = caption_for(job.prompt, seed, index)
        if job.json_mode:
            text = json.dumps({"caption": text})
        pieces = split_tokens(text)
        finish = "length" if len(pieces) > job.max_tokens else "stop"
        out.append(Choice(index, tuple(pieces[: job.max_tokens]), finish))
    return tuple(out)


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _sse(obj: Any, event: str | None = None) -> Frame:
    prefix = f"event: {event}\n" if event else ""
    return Frame(f"{prefix}data: {_json(obj)}\n\n".encode())


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
                   created, json_mode)

    def error(self, err: ApiError, request_id: str) -> web.Response:
        detail = {"message": err.message, "type": err.openai_type}
        detail |= {"param": err.param, "code": err.code}
        headers = {self.request_id_header: request_id}
        if err.retry_after is not None:
            headers["Retry-After"] = _retry_after_text(err.retry_after)
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
        }  # fmt: skip

    def limit_headers(self, limits: RateLimits) -> dict[str, str]:
        headers = {}
        for kind, bucket in limits.buckets.items():
            headers[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level())))
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
            headers["retry-after"] = str(max(1, math.ceil(err.retry_after)))
        if err.status == 400:
            headers["x-should-retry"] = "false"
        body = {"type": "error", "error": detail, "request_id": request_id}
        return web.json_response(body, status=err.status, headers=headers)

    def plan(self, job: Job, choices: tuple[Choice, ...]) -> Plan:
        choice = choices[0]
        usage = {"input_tokens": job.prompt.tokens, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0, "output_tokens": 1}  # fmt: skip
        message = {"id": job.response_id, "type": "message", "role": "assistant", "content": [],
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
            headers[f"{prefix}-remaining"] = str(max(0, math.floor(bucket.level())))
            headers[f"{prefix}-reset"] = reset.strftime("%Y-%m-%dT%H:%M:%SZ")
        return headers

    @staticmethod
    def _delta(piece: str) -> Frame:
        return _event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})


def _event(name: str, **fields: Any) -> Frame:
    """An Anthropic event: the SSE `event:` name repeats the JSON `type`."""
    return _sse({"type": name, **fields}, name)


OPENAI, ANTHROPIC = OpenAIDialect(), AnthropicDialect()
_DIALECTS: dict[str, Dialect] = {"/v1/chat/completions": OPENAI, "/v1/messages": ANTHROPIC}


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
    return value


# ---------------------------------------------------------------- the shared request flow

CONFIG = web.AppKey("CONFIG", SimConfig)
STATS = web.AppKey("STATS", SimStats)
LIMITS = web.AppKey("LIMITS", RateLimits)
FAULTS = web.AppKey("FAULTS", random.Random)
CLOSING = web.AppKey("CLOSING", asyncio.Event)


def _draw_fault(app: web.Application) -> str | None:
    config, rng = app[CONFIG], app[FAULTS]
    # Always two draws, so request k meets the same fate whatever the earlier requests were.
    roll, pick = rng.random(), rng.random()
    if roll >= config.fail_rate or not config.fail_modes:
        return None
    return config.fail_modes[int(pick * len(config.fail_modes))]


async def _handle(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    fault = _draw_fault(request.app)  # before any await: faults follow arrival order
    request.app[STATS].requests_total += 1
    request_id = f"req_{secrets.token_hex(12)}"
    try:
        if dialect.api_key(request) == INVALID_KEY:  # the key itself is never echoed
            raise ApiError(401, "Incorrect API key provided", "invalid_request_error",
                           "authentication_error", "invalid_api_key")  # fmt: skip
        job = await _parse(request, dialect, request_id)
        reserved = job.prompt.tokens + job.max_tokens * job.n
        refusal = request.app[LIMITS].admit(reserved)
        if refusal is not None:
            raise _rate_limit_error(refusal, job.model)
    except ApiError as err:
        return dialect.error(err, request_id)
    return await _serve(request, dialect, job, fault, reserved)


async def _parse(request: web.Request, dialect: Dialect, request_id: str) -> Job:
    try:
        body = json.loads(await request.read())
    except ValueError:  # includes UnicodeDecodeError
        body = None
    try:
        if not isinstance(body, dict):
            raise BadRequest("We could not parse the JSON body of your request.")
        return await dialect.parse(body, request.app[CONFIG], request_id)
    except BadRequest as exc:
        raise ApiError(400, exc.message, "invalid_request_error", "invalid_request_error",
                       param=exc.param) from None  # fmt: skip


@dataclass
class _Exchange:
    """One admitted request being answered; mutable so a cancelled stream still counts."""

    request: web.Request
    dialect: Dialect
    job: Job
    fault: str | None
    completion: int = 0  # content pieces actually delivered


async def _serve(
    request: web.Request, dialect: Dialect, job: Job, fault: str | None, reserved: int
) -> web.StreamResponse:
    """Answer an admitted request; always reconcile the token bucket with actual use."""
    app, stats, prompt_used = request.app, request.app[STATS], 0
    exchange = _Exchange(request, dialect, job, fault)
    stats.accepted_at.append(time.monotonic())
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        if fault:
            stats.faults[fault] += 1
        if fault in _HTTP_FAULTS:
            return _http_fault(dialect, fault, job.request_id)
        choices = _choices(job, app[CONFIG].seed)
        prompt_used = job.prompt.tokens
        await asyncio.sleep(app[CONFIG].latency)
        return await (_stream if job.stream else _complete)(exchange, choices)
    finally:  # also on cancellation, when the client hangs up mid-stream
        stats.in_flight -= 1
        stats.prompt_tokens += prompt_used
        stats.completion_tokens += exchange.completion
        app[LIMITS].refund(reserved - prompt_used - exchange.completion)


def _http_fault(dialect: Dialect, fault: str, request_id: str) -> web.Response:
    if fault == "502html":  # a CDN/proxy page, not JSON (reference 7, item 36)
        headers = {dialect.request_id_header: request_id}
        return web.Response(status=502, text=_HTML_502, content_type="text/html", headers=headers)
    return dialect.error(_fault_error(fault), request_id)


async def _stream(ex: _Exchange, choices: tuple[Choice, ...]) -> web.StreamResponse:
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    headers[ex.dialect.request_id_header] = ex.job.request_id
    response = web.StreamResponse(headers=headers)
    await response.prepare(ex.request)
    plan = ex.dialect.plan(ex.job, choices)
    await _play(ex, response, _faulted(plan, ex.dialect.endings(), ex.fault))
    return response


def _faulted(
    plan: Plan, endings: dict[str, tuple[Frame, ...]], fault: str | None
) -> tuple[Frame, ...]:
    """The frames to send: the whole plan, or a prefix of it ended the way `fault` says."""
    if fault is None:
        return plan.head + plan.tokens + plan.tail
    if fault == "done_no_finish":
        return plan.head + plan.tokens + endings[fault]
    some = plan.tokens[: max(1, len(plan.tokens) // 2)]
    ending = {"truncate": (_CLOSE,), "stall": (_STALL,)}.get(fault) or endings[fault]
    return plan.head + some + ending


async def _play(ex: _Exchange, response: web.StreamResponse, frames: tuple[Frame, ...]) -> None:
    """Write each event with its own write, counting the content pieces delivered."""
    pacer = _Pacer(ex.request.app[CONFIG].tokens_per_second)
    try:
        for frame in frames:
            if frame.action == "stall":
                await _stall(ex.request)
            if frame.action:
                _cut(ex.request)
                return
            if frame.token:
                await pacer.wait()
            await response.write(frame.data)
            ex.completion += frame.token
    except ConnectionError:  # the client went away; nothing left to do
        pass


class _Pacer:
    """Spaces content pieces 1/tps apart on an absolute schedule, so sleeps do not drift."""

    def __init__(self, tokens_per_second: float) -> None:
        fast = tokens_per_second <= 0 or math.isinf(tokens_per_second)
        self._interval = 0.0 if fast else 1.0 / tokens_per_second
        self._next: float | None = None

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        due = now if self._next is None else self._next
        if due > now:
            await asyncio.sleep(due - now)
        # max(): after a slow write, carry on at the rate instead of bursting to catch up.
        self._next = max(due, now) + self._interval


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _cut(request: web.Request) -> None:
    """Close the TCP connection mid-body: the client sees a real cut, not a clean end."""
    if request.transport is not None:
        request.transport.close()  # close() still flushes what was already written


async def _stall(request: web.Request) -> None:
    """Go silent for up to an hour; stop early if the client leaves or the server stops."""
    closing, loop = request.app[CLOSING], asyncio.get_running_loop()
    deadline = loop.time() + STALL_SECONDS
    while _connected(request) and not closing.is_set() and loop.time() < deadline:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), 0.25)


async def _complete(ex: _Exchange, choices: tuple[Choice, ...]) -> web.StreamResponse:
    """A non-streamed answer; stream faults get their closest non-streamed equivalent."""
    headers = {ex.dialect.request_id_header: ex.job.request_id}
    if ex.fault == "error_event":
        return ex.dialect.error(_fault_error("500"), ex.job.request_id)
    if ex.fault == "bad_json":
        return web.Response(body=b"{not json", content_type="application/json", headers=headers)
    if ex.fault == "stall":
        await _stall(ex.request)
        _cut(ex.request)
        return web.Response(status=504)
    body = _json(ex.dialect.body(ex.job, choices, finished=ex.fault != "done_no_finish"))
    if ex.fault == "truncate":
        return await _truncated(ex, body.encode(), headers)
    ex.completion = sum(len(c.pieces) for c in choices)
    return web.Response(text=body, content_type="application/json", headers=headers)


async def _truncated(ex: _Exchange, body: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """Announce the full Content-Length, send half the body, then cut the connection."""
    response = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(ex.request)
    with contextlib.suppress(ConnectionError):
        await response.write(body[: len(body) // 2])
    _cut(ex.request)
    return response


# ---------------------------------------------------------------- the application


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, OPENAI)


async def _messages(request: web.Request) -> web.StreamResponse:
    return await _handle(request, ANTHROPIC)


async def _models(request: web.Request) -> web.Response:
    model = {"id": "simulator-caption-1", "object": "model", "created": 0, "owned_by": "simulator"}
    return web.json_response({"object": "list", "data": [model]})


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Rate-limit headers on every API answer (429s included), and status counters."""
    dialect = _DIALECTS.get(request.path) if request.method == "POST" else None
    if dialect is None:
        return
    app = request.app
    if app[CONFIG].rate_limit_headers:
        response.headers.update(dialect.limit_headers(app[LIMITS]))
    app[STATS].statuses[response.status] += 1
    if response.status == 429:
        app[STATS].requests_429 += 1
        app[STATS].rejected_at.append(time.monotonic())


async def _on_shutdown(app: web.Application) -> None:
    app[CLOSING].set()  # wakes stalled streams so shutdown does not wait an hour


def build_app(config: SimConfig) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[CONFIG], app[STATS], app[LIMITS] = config, SimStats(), RateLimits(config)
    app[FAULTS], app[CLOSING] = random.Random(config.seed), asyncio.Event()
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.on_response_prepare.append(_on_prepare)
    app.on_shutdown.append(_on_shutdown)
    return app


async def start(
    config: SimConfig, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serve on host:port (0 = a free port); returns the runner (call cleanup()) and the port."""
    # handler_cancellation: a client that hangs up cancels its handler (stalls included);
    # a short shutdown_timeout keeps cleanup() fast even with streams still open.
    runner = web.AppRunner(
        build_app(config), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


# ---------------------------------------------------------------- command line


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line instead of usage + message
        raise _UsageError(message)


def _fail_modes(text: str) -> tuple[str, ...]:
    return tuple(mode.strip() for mode in text.split(",") if mode.strip())


def _arg_parser() -> _Parser:
    d = SimConfig()
    parser = _Parser(
        prog="simulate",
        description="Local OpenAI/Anthropic-compatible gateway SIMULATOR (no model runs).",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to bind (default %(default)s)")
    add("--port", type=int, default=0, help="port; 0 picks a free one (default)")
    add("--latency", type=float, default=d.latency, help="seconds before the first byte")
    add("--tokens-per-second", type=float, default=d.tokens_per_second, help="0 = no pacing")
    add("--fail-rate", type=float, default=d.fail_rate, help="fraction of requests faulted")
    add("--fail-modes", type=_fail_modes, default=d.fail_modes,
        help=f"comma list among {','.join(FAULT_MODES)}")  # fmt: skip
    add("--seed", type=int, default=d.seed, help="seed for faults and captions")
    add("--rpm", type=int, default=None, help="requests per window (token bucket)")
    add("--tpm", type=int, default=None, help="tokens per window (token bucket)")
    add("--window", type=float, default=d.window, help="rate-limit window in seconds")
    add("--no-rate-limit-headers", dest="rate_limit_headers", action="store_false",
        help="omit the x-ratelimit-* / anthropic-ratelimit-* headers")  # fmt: skip
    return parser


def _config_from(args: argparse.Namespace) -> SimConfig:
    if not 0 <= args.port <= 65535:
        raise ValueError("port must be between 0 and 65535")
    return SimConfig(
        latency=args.latency, tokens_per_second=args.tokens_per_second,
        fail_rate=args.fail_rate, fail_modes=args.fail_modes, seed=args.seed, rpm=args.rpm,
        tpm=args.tpm, window=args.window, rate_limit_headers=args.rate_limit_headers,
    )  # fmt: skip


async def _serve_forever(config: SimConfig, host: str, port: int) -> None:
    runner, bound = await start(config, host, port)
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    url_host = f"[{host}]" if ":" in host else host
    print(f"simulator listening on http://{url_host}:{bound}/v1", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline simulate ...`: serve until SIGINT/SIGTERM, then exit 0."""
    try:
        args = _arg_parser().parse_args(argv)
        config = _config_from(args)
    except (_UsageError, ValueError) as exc:
        print(f"simulate: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve_forever(config, args.host, args.port))
    except OSError as exc:
        print(f"simulate: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
