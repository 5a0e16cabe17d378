"""Local gateway SIMULATOR (no model runs) for demo, tests and benchmarks, in four dialects.

Owns the application: the routes (`POST /v1/chat/completions`, `POST /v1/messages`,
`POST /v1/responses`, `POST /v1beta/models/{model}:streamGenerateContent` and
`:generateContent`, `GET /v1/models`, `GET /health`), the scenario (`SimConfig`), the
request flow shared by every protocol (auth, parsing, admission against the rate
limits, injected faults, token accounting), counters for benchmarks (`app[STATS]`) and
`start`/`build_app`. The rest lives next to it:

- `simulator.wire`: the shared framing and the OpenAI chat dialect; `simulator.anthropic`,
  `simulator.responses`, `simulator.gemini`: the other dialects (docs/protocol.md §2.3,
  §3.2, §14.2, §15.2; rate-limit headers §5.2, §5.3);
- `simulator.answers`, `simulator.behaviour`: what the simulated model answers
  (captions, reasoning, tool calls, refusals) whatever the dialect;
- `simulator.errors`: the error answers (faults, 429s, `--retry-after`);
- `simulator.limits`: the limiter kinds (token bucket, sliding log, fixed window,
  cap in flight) and their time texts;
- `simulator.delivery`: pacing a stream (`--split-bytes` too) and the faults that cut or
  stall an answer;
- `simulator.captions`: what the simulated model "says" and what a prompt costs;
- `simulator.cli`: the command line.

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import batch as batch_api
from . import flex
from .answers import choices_for
from .anthropic import ANTHROPIC
from .captions import BadRequest
from .delivery import Exchange, complete, stream
from .errors import ApiError, fault_error, rate_limit_error, with_retry_after
from .gemini import GeminiDialect
from .limits import LIMITER_KINDS, RateLimits, Refusal, TokenBucket, go_duration
from .responses import RESPONSES
from .wire import OPENAI, Dialect, Job

__all__ = [
    "CONFIG", "FAULT_MODES", "LIMITS", "STATS", "RateLimits", "SimConfig", "SimStats",
    "TokenBucket", "build_app", "go_duration", "start",
]  # fmt: skip

FAULT_MODES = (
    "429", "500", "502html", "503", "529",
    "truncate", "error_event", "stall", "bad_json", "done_no_finish",
)  # fmt: skip
_HTTP_FAULTS = frozenset({"429", "500", "502html", "503", "529"})
INVALID_KEY = "sk-invalid"
MAX_BODY_BYTES = 32 * 1024 * 1024  # the Messages API request limit (docs/protocol.md §7.1)
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
    rpm: int | None = None  # server-side limits per `window`, counted as `limiter` says
    tpm: int | None = None
    window: float = 60.0  # the limits are per `window` seconds
    limiter: str = "bucket"  # bucket | sliding | fixed | concurrency (simulator.limits)
    max_in_flight: int | None = None  # the cap of the `concurrency` limiter
    rate_limit_headers: bool = True  # send x-ratelimit-* headers
    # Retry-After on 429/503: "auto" = the limiter's own wait, "none" = never (nor the
    # "try again in" hint), anything else = sent literally ("0", "-1", "soon", ...).
    retry_after: str = "auto"
    storm: float = 0.0  # answer every request 429 for this many seconds from the first one
    max_tokens_default: int = 300
    split_bytes: int = 0  # write every event in pieces of N bytes (awkward splits); 0: whole
    batch: batch_api.BatchConfig = field(default_factory=batch_api.BatchConfig)
    flex_unavailable_rate: float = 0.0  # flex requests refused "429 Resource Unavailable"

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
        f"limiter must be one of {','.join(LIMITER_KINDS)}": c.limiter in LIMITER_KINDS,
        "the concurrency limiter needs max_in_flight >= 1 and no rpm/tpm": (
            c.limiter != "concurrency"
            or (c.max_in_flight is not None and c.max_in_flight >= 1 and not (c.rpm or c.tpm))
        ),
        "max_in_flight applies to the concurrency limiter only": (
            c.max_in_flight is None or c.limiter == "concurrency"
        ),
        "storm must be a finite number >= 0": math.isfinite(c.storm) and c.storm >= 0,
        "retry_after must not be empty": bool(c.retry_after.strip()),
        "max_tokens_default must be >= 1": c.max_tokens_default >= 1,
        "split_bytes must be >= 0": c.split_bytes >= 0,
        "flex_unavailable_rate must be between 0 and 1": 0 <= c.flex_unavailable_rate <= 1,
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
    in_flight_log: list[tuple[float, int]] = field(default_factory=list)  # (when, in flight)
    statuses: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    # The last request bodies, parsed (tests read what a client sent: a re-ask's turns).
    bodies: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=256))

    @property
    def tokens_served(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# ---------------------------------------------------------------- the shared request flow

CONFIG = web.AppKey("CONFIG", SimConfig)
STATS = web.AppKey("STATS", SimStats)
LIMITS = web.AppKey("LIMITS", RateLimits)
FAULTS = web.AppKey("FAULTS", random.Random)
CLOSING = web.AppKey("CLOSING", asyncio.Event)
DIALECT = web.RequestKey("DIALECT", object)  # a dialect made for one request (Gemini)
DIALECTS: dict[str, Dialect] = {"/v1/chat/completions": OPENAI, "/v1/messages": ANTHROPIC,
                                "/v1/responses": RESPONSES}
STORM = web.AppKey("STORM", list)  # [monotonic time of the first API request], once known
USED = web.RequestKey("USED", int)  # tokens an admitted request really used, so far
LIMIT_HEADERS = web.RequestKey("LIMIT_HEADERS", dict)  # the limits as of its admission


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
        if flex.refused(request.app, job.service_tier, request.app[CONFIG].flex_unavailable_rate):
            raise flex.capacity_error()  # no capacity on flex: not a rate limit
        if _in_storm(request.app):
            raise fault_error("storm")
        reserved = job.prompt.tokens + job.max_tokens * job.n
        ticket = request.app[LIMITS].admit(reserved)
        # As real servers do, the headers tell the state right after this admission
        # (a stream's head goes out later, after the time to first token).
        request[LIMIT_HEADERS] = dialect.limit_headers(request.app[LIMITS])
        if isinstance(ticket, Refusal):
            raise rate_limit_error(ticket, job.model)
    except ApiError as err:
        return dialect.error(with_retry_after(err, request.app[CONFIG]), request_id)
    try:
        return await _serve(request, dialect, job, fault, reserved)
    finally:  # also on cancellation, when the client hangs up mid-stream
        request.app[LIMITS].release(ticket, reserved - request[USED])


def _in_storm(app: web.Application) -> bool:
    """`storm` seconds of nothing but 429s, counted from the first API request."""
    seconds, started = app[CONFIG].storm, app[STORM]
    if not seconds:
        return False
    if not started:
        started.append(time.monotonic())
    return bool(time.monotonic() - started[0] < seconds)


async def _parse(request: web.Request, dialect: Dialect, request_id: str) -> Job:
    try:
        body = json.loads(await request.read())
    except ValueError:  # includes UnicodeDecodeError
        body = None
    try:
        if not isinstance(body, dict):
            raise BadRequest("We could not parse the JSON body of your request.")
        request.app[STATS].bodies.append(body)
        return await dialect.parse(body, request.app[CONFIG], request_id)
    except BadRequest as exc:
        raise ApiError(400, exc.message, "invalid_request_error", "invalid_request_error",
                       param=exc.param) from None  # fmt: skip


async def _serve(
    request: web.Request, dialect: Dialect, job: Job, fault: str | None, reserved: int
) -> web.StreamResponse:
    """Answer an admitted request; count what it really used (the limits get the rest back)."""
    app, stats, prompt_used = request.app, request.app[STATS], 0
    config = app[CONFIG]
    request[USED] = 0
    exchange = Exchange(request, dialect, job, fault, config.tokens_per_second, app[CLOSING],
                        split_bytes=config.split_bytes)
    stats.accepted_at.append(time.monotonic())
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    stats.in_flight_log.append((time.monotonic(), stats.in_flight))
    try:
        if fault:
            stats.faults[fault] += 1
        if fault in _HTTP_FAULTS:
            return _http_fault(dialect, fault, job.request_id, config)
        choices = choices_for(job, config.seed)
        prompt_used = job.prompt.tokens
        await asyncio.sleep(config.latency)
        return await (stream if job.stream else complete)(exchange, choices)
    finally:  # also on cancellation, when the client hangs up mid-stream
        stats.in_flight -= 1
        stats.in_flight_log.append((time.monotonic(), stats.in_flight))
        stats.prompt_tokens += prompt_used
        stats.completion_tokens += exchange.completion
        request[USED] = prompt_used + exchange.completion


def _http_fault(dialect: Dialect, fault: str, request_id: str, config: SimConfig
                ) -> web.Response:  # fmt: skip
    if fault == "502html":  # a CDN/proxy page, not JSON (docs/protocol.md §8.36)
        headers = {dialect.request_id_header: request_id}
        return web.Response(status=502, text=_HTML_502, content_type="text/html", headers=headers)
    return dialect.error(with_retry_after(fault_error(fault), config), request_id)


# ---------------------------------------------------------------- the application


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, OPENAI)


async def _messages(request: web.Request) -> web.StreamResponse:
    return await _handle(request, ANTHROPIC)


async def _responses(request: web.Request) -> web.StreamResponse:
    return await _handle(request, RESPONSES)


async def _gemini(request: web.Request) -> web.StreamResponse:
    """``/v1beta/models/{model}:{method}``: the dialect is made per request, as the
    model and the method (streamed or not) are in the path."""
    model, _, method = request.match_info["call"].rpartition(":")
    if method not in ("streamGenerateContent", "generateContent") or not model:
        raise web.HTTPNotFound()
    dialect = GeminiDialect(model, method == "streamGenerateContent")
    request[DIALECT] = dialect
    return await _handle(request, dialect)


async def _models(request: web.Request) -> web.Response:
    model = {"id": "simulator-caption-1", "object": "model", "created": 0, "owned_by": "simulator"}
    return web.json_response({"object": "list", "data": [model]})


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Rate-limit headers on every API answer (429s included), and status counters."""
    dialect = DIALECTS.get(request.path) if request.method == "POST" else None
    dialect = request.get(DIALECT, dialect)
    if dialect is None:
        return
    app = request.app
    if app[CONFIG].rate_limit_headers:
        snapshot = request.get(LIMIT_HEADERS)
        response.headers.update(snapshot if snapshot is not None
                                else dialect.limit_headers(app[LIMITS]))
    app[STATS].statuses[response.status] += 1
    if response.status == 429:
        app[STATS].requests_429 += 1
        app[STATS].rejected_at.append(time.monotonic())


async def _on_shutdown(app: web.Application) -> None:
    app[CLOSING].set()  # wakes stalled streams so shutdown does not wait an hour


def build_app(config: SimConfig) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[CONFIG], app[STATS], app[LIMITS] = config, SimStats(), RateLimits(config)
    app[FAULTS], app[CLOSING], app[STORM] = random.Random(config.seed), asyncio.Event(), []
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/v1beta/models/{call}", _gemini)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    batch_api.install(app, config.batch, config.seed, config)  # files, batches (both APIs)
    flex.install(app, config.seed)
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
