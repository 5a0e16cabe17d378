"""How the local gateway SIMULATOR writes an admitted answer onto the connection.

Owns the delivery half of the request flow: a stream paced at `tokens_per_second`
with one write per event, a non-streamed body, and the faults that hit a response
after its status line is out: a cut connection (`truncate`, also a body shorter than
its Content-Length), an hour of silence (`stall`, released when the client leaves or
the server stops), an `error` event, broken JSON or a stream without a finish reason.
It counts the content pieces actually delivered, so a cancelled stream still counts.

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
The request flow that hands answers over lives in `simulator.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

from aiohttp import web

from .errors import fault_error
from .wire import (
    CLOSE,
    STALL,
    Choice,
    Dialect,
    Frame,
    Job,
    Plan,
    compact_json,
)

__all__ = ["STALL_SECONDS", "Exchange", "complete", "stream"]

STALL_SECONDS = 3600.0


@dataclass
class Exchange:
    """One admitted request being answered; mutable so a cancelled stream still counts."""

    request: web.Request
    dialect: Dialect
    job: Job
    fault: str | None
    tokens_per_second: float  # the app's pacing, SimConfig.tokens_per_second
    closing: asyncio.Event  # set when the server shuts down: releases stalls
    completion: int = 0  # content pieces actually delivered


async def stream(ex: Exchange, choices: tuple[Choice, ...]) -> web.StreamResponse:
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
    ending = {"truncate": (CLOSE,), "stall": (STALL,)}.get(fault) or endings[fault]
    return plan.head + some + ending


async def _play(ex: Exchange, response: web.StreamResponse, frames: tuple[Frame, ...]) -> None:
    """Write each event with its own write, counting the content pieces delivered."""
    pacer = _Pacer(ex.tokens_per_second)
    try:
        for frame in frames:
            if frame.action == "stall":
                await _stall(ex)
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


async def _stall(ex: Exchange) -> None:
    """Go silent for up to an hour; stop early if the client leaves or the server stops."""
    request, closing, loop = ex.request, ex.closing, asyncio.get_running_loop()
    deadline = loop.time() + STALL_SECONDS
    while _connected(request) and not closing.is_set() and loop.time() < deadline:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), 0.25)


async def complete(ex: Exchange, choices: tuple[Choice, ...]) -> web.StreamResponse:
    """A non-streamed answer; stream faults get their closest non-streamed equivalent."""
    headers = {ex.dialect.request_id_header: ex.job.request_id}
    if ex.fault == "error_event":
        return ex.dialect.error(fault_error("500"), ex.job.request_id)
    if ex.fault == "bad_json":
        return web.Response(body=b"{not json", content_type="application/json", headers=headers)
    if ex.fault == "stall":
        await _stall(ex)
        _cut(ex.request)
        return web.Response(status=504)
    finished = ex.fault != "done_no_finish"
    body = compact_json(ex.dialect.body(ex.job, choices, finished=finished))
    if ex.fault == "truncate":
        return await _truncated(ex, body.encode(), headers)
    ex.completion = sum(len(c.pieces) for c in choices)
    return web.Response(text=body, content_type="application/json", headers=headers)


async def _truncated(ex: Exchange, body: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """Announce the full Content-Length, send half the body, then cut the connection."""
    response = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(ex.request)
    with contextlib.suppress(ConnectionError):
        await response.write(body[: len(body) // 2])
    _cut(ex.request)
    return response
