"""Local OpenAI/Anthropic-compatible gateway SIMULATOR (no model runs) for demo, tests, benchmarks.

Owns the application: the routes (`POST /v1/chat/completions`, `POST /v1/messages`,
`GET /v1/models`, `GET /health`), the scenario (`SimConfig`), the request flow shared
by both protocols (auth, parsing, admission against the rate limits, injected faults,
token accounting), counters for benchmarks (`app[STATS]`), `start`/`build_app` and a
small CLI. The rest lives next to it:

- `pipeline.sim_wire`: the OpenAI and Anthropic dialects (request fields, stream events
  and bodies, error bodies, rate-limit headers; docs/protocol.md §2.3, §3.2, §5.2, §5.3);
- `pipeline.sim_limits`: the continuously refilled token buckets and their time texts;
- `pipeline.sim_delivery`: pacing a stream and the faults that cut or stall an answer;
- `pipeline.sim_captions`: what the simulated model "says" and what a prompt costs.

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import secrets
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import batch as batch_api
from .captions import BadRequest, caption_for, split_tokens
from .delivery import Exchange, complete, stream
from .help import triggers_help
from .limits import RateLimits, TokenBucket, go_duration
from .wire import (
    ANTHROPIC,
    DIALECTS,
    OPENAI,
    ApiError,
    Choice,
    Dialect,
    Job,
    fault_error,
    rate_limit_error,
)

__all__ = [
    "CONFIG", "FAULT_MODES", "LIMITS", "RateLimits", "SimConfig", "SimStats",
    "TokenBucket", "build_app", "go_duration", "main", "start",
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
    rpm: int | None = None  # server-side limits (token buckets, continuously refilled)
    tpm: int | None = None
    window: float = 60.0  # the limits are per `window` seconds
    rate_limit_headers: bool = True  # send x-ratelimit-* headers
    max_tokens_default: int = 300
    batch: batch_api.BatchConfig = field(default_factory=batch_api.BatchConfig)

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
            raise rate_limit_error(refusal, job.model)
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


async def _serve(
    request: web.Request, dialect: Dialect, job: Job, fault: str | None, reserved: int
) -> web.StreamResponse:
    """Answer an admitted request; always reconcile the token bucket with actual use."""
    app, stats, prompt_used = request.app, request.app[STATS], 0
    config = app[CONFIG]
    exchange = Exchange(request, dialect, job, fault, config.tokens_per_second, app[CLOSING])
    stats.accepted_at.append(time.monotonic())
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        if fault:
            stats.faults[fault] += 1
        if fault in _HTTP_FAULTS:
            return _http_fault(dialect, fault, job.request_id)
        choices = _choices(job, config.seed)
        prompt_used = job.prompt.tokens
        await asyncio.sleep(config.latency)
        return await (stream if job.stream else complete)(exchange, choices)
    finally:  # also on cancellation, when the client hangs up mid-stream
        stats.in_flight -= 1
        stats.prompt_tokens += prompt_used
        stats.completion_tokens += exchange.completion
        app[LIMITS].refund(reserved - prompt_used - exchange.completion)


def _http_fault(dialect: Dialect, fault: str, request_id: str) -> web.Response:
    if fault == "502html":  # a CDN/proxy page, not JSON (docs/protocol.md §8.36)
        headers = {dialect.request_id_header: request_id}
        return web.Response(status=502, text=_HTML_502, content_type="text/html", headers=headers)
    return dialect.error(fault_error(fault), request_id)


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
    dialect = DIALECTS.get(request.path) if request.method == "POST" else None
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
    batch_api.install(app, config.batch, config.seed, config)  # files, batches (both APIs)
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
        epilog=triggers_help(FAULT_MODES, INVALID_KEY),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    batch_api.add_arguments(add)
    return parser


def _config_from(args: argparse.Namespace) -> SimConfig:
    if not 0 <= args.port <= 65535:
        raise ValueError("port must be between 0 and 65535")
    return SimConfig(
        latency=args.latency, tokens_per_second=args.tokens_per_second,
        fail_rate=args.fail_rate, fail_modes=args.fail_modes, seed=args.seed, rpm=args.rpm,
        tpm=args.tpm, window=args.window, rate_limit_headers=args.rate_limit_headers,
        batch=batch_api.config_from(args),
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

