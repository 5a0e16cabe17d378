"""The simulator's command line: `python -m pipeline simulate [flags]` (see `--help`).

Flags map one to one onto `SimConfig` fields; a bad value exits 2 with one line.
It deliberately imports nothing from the client: see `simulator.app`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from . import batch as batch_api
from .app import FAULT_MODES, INVALID_KEY, SimConfig, start
from .help import triggers_help
from .limits import LIMITER_KINDS


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
    add("--limiter", choices=LIMITER_KINDS, default=d.limiter,
        help="how --rpm/--tpm are counted: token bucket (default), sliding log, fixed "
             "clock window; or concurrency: at most --max-in-flight answered at once")
    add("--max-in-flight", type=int, default=None, help="the cap of --limiter concurrency")
    add("--no-rate-limit-headers", dest="rate_limit_headers", action="store_false",
        help="omit the x-ratelimit-* / anthropic-ratelimit-* headers")
    add("--retry-after", default=d.retry_after, metavar="auto|none|VALUE",
        help="Retry-After on 429/503: the limiter's wait (auto), none (nor the 'try again "
             "in' hint), or VALUE sent literally, e.g. 0, -1, soon")
    add("--storm", type=float, default=d.storm, metavar="SECONDS",
        help="answer every request 429 for SECONDS from the first one")  # fmt: skip
    add("--split-bytes", type=int, default=d.split_bytes, metavar="N",
        help="write every stream event in pieces of N bytes (0: whole events)")
    batch_api.add_arguments(add)
    add("--flex-unavailable-rate", type=float, default=d.flex_unavailable_rate,
        help="fraction of service_tier=flex requests refused 429 'Resource Unavailable'")
    return parser


def _config_from(args: argparse.Namespace) -> SimConfig:
    if not 0 <= args.port <= 65535:
        raise ValueError("port must be between 0 and 65535")
    return SimConfig(
        latency=args.latency, tokens_per_second=args.tokens_per_second,
        fail_rate=args.fail_rate, fail_modes=args.fail_modes, seed=args.seed, rpm=args.rpm,
        tpm=args.tpm, window=args.window, limiter=args.limiter,
        max_in_flight=args.max_in_flight, rate_limit_headers=args.rate_limit_headers,
        retry_after=args.retry_after, storm=args.storm, split_bytes=args.split_bytes,
        batch=batch_api.config_from(args), flex_unavailable_rate=args.flex_unavailable_rate,
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
