"""Pacing requests to the rate limit the user pays for, whatever kind of limiter enforces it.

A server may count with a token bucket, a sliding window, a fixed clock-minute window
or a cap on requests in flight, and may or may not say so in headers. The limiter
holds the rate against all of them with meters from ``pipeline.meters`` and
``pipeline.headerlimits``, in this order for every request:

1. the pool-wide pause (after a 429, every worker waits, not only one);
2. a place in flight (slow start until the first limit signal, AIMD on overload);
3. the pacers: the user's budgets (``--rpm`` ...), paced at 98 % with no burst so no
   window ever sees more than the budget; else the pace learned from headers (limit
   per window); else a rate adapted from 429s;
4. the ceilings from headers: ``remaining`` until ``reset``, counting requests in flight.

Token costs are estimated before sending (image + prompt + ``max_tokens`` reserved) and
reconciled with the usage the server reports, so estimates never drift. ``waiting``
says what the run waits for and until when, for the status line. Clock and sleep are
injected; nothing here knows of HTTP, images or files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .headerlimits import HeaderCeiling, read_limits
from .meters import (
    PACE_SHARE,
    AdaptiveConcurrency,
    AdaptiveRate,
    Clock,
    PauseGate,
    Sleep,
    TokenBucket,
)

__all__ = ["AdaptiveConcurrency", "AdaptiveRate", "Budgets", "Limiter", "Outcome", "PauseGate",
           "Permit", "TokenBucket", "Waiting", "read_limits"]

log = logging.getLogger("pipeline")
_LONG_WAIT = 10.0  # seconds: a wait this long is announced, not only shown in the status


class Outcome(StrEnum):
    """How a sent request ended, as far as pacing cares."""

    OK = "ok"                  # served, with usage to reconcile
    THROTTLED = "throttled"    # 429: too fast (the rate)
    OVERLOADED = "overloaded"  # 529: too busy (the requests in flight)
    ERROR = "error"            # served, but no usable usage


@dataclass(frozen=True)
class Budgets:
    """User budgets per minute; None = learn from headers (or adapt)."""

    rpm: float | None = None
    tpm: float | None = None
    itpm: float | None = None
    otpm: float | None = None


@dataclass
class Permit:
    cost_in: int      # charged: the estimate times the learned input scale
    cost_out: int
    estimate_in: int  # the raw estimate, to learn the scale from
    sent_at: float = 0.0
    in_flight: int = 0  # requests in flight when it was sent, itself included
    admitted: bool = False  # the server took it (a 2xx head came back)
    marks: dict[str, float] = field(default_factory=dict)  # header ceilings' counters


@dataclass(frozen=True)
class Waiting:
    what: str
    until: float  # on the limiter's clock

    def describe(self, now: float, wall_now: float | None = None) -> str:
        left = max(0.0, self.until - now)
        wall = (time.time() if wall_now is None else wall_now) + left
        return f"waiting for {self.what} until {time.strftime('%H:%M:%S', time.localtime(wall))} " \
               f"(in {left:.0f} s)"


class Limiter:
    """All meters together: pause gate → place in flight → pacers and ceilings, then reconcile."""

    def __init__(self, budgets: Budgets, concurrency: int, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep, max_wait: float = 600.0) -> None:
        self.clock = clock
        self.sleep = sleep
        self.max_wait = max_wait
        self.gate = PauseGate(clock, sleep)
        self.buckets: dict[str, TokenBucket] = {
            name: TokenBucket(per_minute / 60.0 * PACE_SHARE, clock)
            for name, per_minute in vars(budgets).items() if per_minute}
        # Slow start, unless the user said what the limit is: no need to find it out.
        self.slots = AdaptiveConcurrency(concurrency, clock,
                                         initial=concurrency if self.buckets else 1)
        self.ceilings: dict[str, HeaderCeiling] = {}
        self.adaptive = AdaptiveRate(clock)
        self.input_scale = 1.0  # learned ratio of reported to estimated input tokens
        self._scaled = False
        self._pacer = asyncio.Lock()
        self._news = asyncio.Event()  # a new header reading may lift a ceiling early
        self.ramp: TokenBucket | None = None  # paces the slow start's doubling
        self._rtt: float | None = None  # seconds from permit to answer, smoothed
        self.throttled = 0
        self.streak = 0  # refusals since the last success, each burst counted once
        self._refused_at = -math.inf  # when the streak last grew
        self._streak_since = -math.inf  # when it began
        self._paused_at = -math.inf  # when the pool was last paused
        self.waiting: Waiting | None = None
        self._announced: Waiting | None = None

    @staticmethod
    def _costs(p: Permit) -> dict[str, float]:
        return {"rpm": 1.0, "tpm": p.cost_in + p.cost_out, "itpm": p.cost_in,
                "otpm": p.cost_out}

    async def acquire(self, est_in: int, est_out: int) -> Permit:
        permit = Permit(0, est_out, est_in)
        await self._wait_gate()
        # One pacer at a time: waiters queue on the lock instead of all waking together
        # when the bucket refills (no thundering herd). Only the lock's holder takes a
        # place in flight while it waits, so a window cut meanwhile holds everyone else.
        async with self._pacer:
            held = False
            try:
                while True:
                    await self._wait_gate()
                    if not held:
                        await self.slots.acquire()
                        held = True
                        continue  # that may have taken a while: the gate again
                    # The input scale is learned meanwhile: charge the latest one.
                    permit.cost_in = round(est_in * self.input_scale)
                    costs = self._costs(permit)
                    wait, why = self._longest_wait(costs)
                    if wait <= 0:
                        break
                    self._set_waiting(why, wait)
                    await self._nap(wait)
            except BaseException:
                if held:
                    self.slots.release()
                raise
            self.waiting = None
            self._charge(permit, costs)
        permit.sent_at = self.clock()
        permit.in_flight = self.slots.in_flight
        return permit

    def _charge(self, permit: Permit, costs: dict[str, float]) -> None:
        for name, bucket in self.buckets.items():
            bucket.take(costs[name])
        if self.ramp is not None:
            self.ramp.take(1.0)
        if self._adapts():
            self.adaptive.on_sent()
        for name, c in self.ceilings.items():
            permit.marks[name] = c.charge(costs[name])

    def _longest_wait(self, costs: dict[str, float]) -> tuple[float, str]:
        """(seconds, what for) until every pacer and ceiling lets ``costs`` through."""
        wait, why = 0.0, ""
        for name, bucket in self.buckets.items():
            w = bucket.wait_time(costs[name])
            if w > wait:
                source = ("rate found from 429s" if bucket in (self.adaptive.bucket,
                                                              self.adaptive.provisional)
                          else "pace the server's headers set" if bucket.learned
                          else "budget")
                wait, why = w, f"the {name} {source}"
        for name, c in self.ceilings.items():
            w = c.wait(costs[name])
            if w > wait:
                wait, why = w, c.blocked_reason(name)
        if self.ramp is not None and not self.buckets:
            wait = max(wait, self.ramp.wait_time(1.0))
        return wait, why

    async def _wait_gate(self) -> None:
        if self.gate.remaining > 0:
            self._set_waiting(self._pause_reason(), self.gate.remaining)
            await self.gate.wait()
            # A pacer refilled its credit meanwhile: after a pause it starts empty.
            for bucket in self.buckets.values():
                if bucket.learned:
                    bucket.drain()

    def _pause_reason(self) -> str:
        """What the pool's pause waits for: a header ceiling that keeps it out about as
        long names the cause (a daily quota's reset) better than the 429 that showed it."""
        left = self.gate.remaining
        for name, c in self.ceilings.items():
            if c.wait(1.0) >= left - 1.0:
                return c.blocked_reason(name)
        return "the pause after HTTP 429 (Retry-After or backoff)"

    async def _nap(self, seconds: float) -> None:
        """Sleep, but wake early when a response brings a new reading or a refund."""
        self._news.clear()
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        news = asyncio.ensure_future(self._news.wait())
        try:
            await asyncio.wait({sleeper, news}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, news):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(sleeper, news, return_exceptions=True)

    def _set_waiting(self, what: str, seconds: float) -> None:
        self.waiting = Waiting(what, self.clock() + seconds)
        if seconds >= _LONG_WAIT and (self._announced is None
                                      or self._announced.what != what
                                      or abs(self._announced.until - self.waiting.until) > 1):
            self._announced = self.waiting
            log.warning("%s", self.waiting.describe(self.clock()))

    def describe_wait(self) -> str | None:
        """What the run waits for and until when, while it waits a second or more (the
        gaps of an even pace are no wait); else None."""
        w = self.waiting
        if w is None or w.until - self.clock() < 1.0:
            return None
        return w.describe(self.clock())

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds``; then one request goes first and the window
        ramps back to where it was, so the end of a pause is not the pool at once (a
        pacer would let its credit through, and every one of those may be refused).
        Not when the refusal was the window's own and a pace holds the pool: cutting
        the window took the excess away."""
        self.gate.pause(seconds)
        if not (self.slots.cut and self.buckets):
            self.slots.restart()
            self._paused_at = self.clock()

    def pause_step(self, guided: bool) -> int:
        """Which step of the pool's pause schedule this refusal is: the streak, less the
        refusals answered by cutting a measured pace alone (they paused nothing, so the
        first pause is the schedule's first step, not its third). A longer first pause
        would empty a sliding window, whose excess then stays hidden for a window's
        length and comes back as the next episode. Before a rate was measured (start-up),
        every step of the schedule counts: the limit may be far below the pace."""
        measured = self.adaptive.bucket is not None and self._adapts()
        alone = 2 if measured and not guided else 0
        return max(1, self.streak - alone)

    def refused(self, seconds: float, guided: bool) -> None:
        """The pool's part of a 429: pause everyone when the server said how long, when
        nothing paces the pool yet, or when refusals go on (a window that is used up
        until it turns); the first two unguided refusals in a row are answered by
        cutting the pace alone (a pause, and the ramp after it, cost far more)."""
        if guided or self.streak > 2 or not self.buckets:
            self.pause(seconds)

    def observe(self, headers: Mapping[str, str], permit: Permit | None = None,
                refused: bool = False) -> None:
        """Learn ceilings and the pace from any response's rate-limit headers."""
        limits = read_limits(headers)
        for name, (limit, remaining, seconds) in limits.items():
            c = self.ceilings.get(name)
            if c is None:
                c = self.ceilings[name] = HeaderCeiling(self.clock, self.max_wait)
            mark = permit.marks.get(name) if permit is not None else None
            c.observe(limit, remaining, seconds, c.sent if mark is None else mark,
                      permit.sent_at if permit is not None else None, refused)
            self._learn_pace(name, c.pace())
        if limits:
            self._news.set()

    def _learn_pace(self, name: str, pace: float | None) -> None:
        bucket = self.buckets.get(name)
        if pace is None or not math.isfinite(pace) or (bucket is not None and not bucket.learned):
            return  # a user budget is never overridden (its ceiling still applies)
        rate = pace * PACE_SHARE
        if bucket is None or bucket is self.adaptive.bucket:
            self.buckets[name] = TokenBucket(rate, self.clock, learned=True)
        elif abs(rate - bucket.rate) > 1e-9 * rate:
            bucket.set_rate(rate)

    def cancel(self, permit: Permit) -> None:
        """The permit was granted but the request is not sent after all: give it back."""
        self.slots.release()
        for name, cost in self._costs(permit).items():
            if name in self.buckets:
                self.buckets[name].credit(cost)

    def finish(self, permit: Permit, outcome: Outcome, prompt_tokens: int | None = None,
               completion_tokens: int | None = None, retry_after: float | None = None
               ) -> None:
        """Release the place in flight and reconcile the token buckets with what happened.

        ``outcome``: ok, throttled (429) or overloaded (529): the request was not
        served, or error (served, but no usable usage). ``retry_after``: what a
        refusal said about waiting (a positive, finite one is guidance).
        """
        self.slots.release()
        refund = {"tpm": 0.0, "itpm": 0.0, "otpm": 0.0}
        if outcome in (Outcome.THROTTLED, Outcome.OVERLOADED):
            self.throttled += 1
            if permit.sent_at >= self._refused_at:  # a burst of refusals is one step
                if self.streak == 0:
                    self._streak_since = self.clock()
                self.streak += 1
                self._refused_at = self.clock()
            guided = retry_after is not None and 0 < retry_after < math.inf
            self._on_throttle(outcome, permit.sent_at, permit.in_flight, guided)
            refund = {"tpm": permit.cost_in + permit.cost_out, "itpm": permit.cost_in,
                      "otpm": permit.cost_out}
        elif prompt_tokens is not None and completion_tokens is not None:
            refund = {"tpm": permit.cost_in + permit.cost_out - prompt_tokens - completion_tokens,
                      "itpm": permit.cost_in - prompt_tokens,
                      "otpm": permit.cost_out - completion_tokens}
            if permit.estimate_in > 0 and prompt_tokens > 0:
                ratio = prompt_tokens / permit.estimate_in
                # The first report replaces the guess: refunds of large early
                # over-estimates would let a burst through (a window does not forget).
                self.input_scale = ratio if not self._scaled else \
                    0.9 * self.input_scale + 0.1 * ratio
                self._scaled = True
        else:
            refund["otpm"] = refund["tpm"] = permit.cost_out  # reserved output never came
        for name, amount in refund.items():
            if name in self.buckets and amount:
                self.buckets[name].credit(amount)
                self._news.set()
        if outcome == Outcome.OK:
            if permit.sent_at >= self._streak_since:  # news: sent since the streak began
                self.streak = 0
            self._grow(permit)
            if self._adapts():
                bucket = self.adaptive.on_success(permit.sent_at)
                if bucket is not None:
                    self.buckets["rpm"] = bucket
            self._ramp_on(self.clock() - permit.sent_at)

    def admitted(self, permit: Permit) -> None:
        """The server took the request (its head came back 2xx): the window may grow
        now, not only when a long stream ends, so slow start is a round trip per step."""
        self._grow(permit)

    def _grow(self, permit: Permit) -> None:
        if permit.admitted:
            return
        permit.admitted = True
        if permit.sent_at >= self._paused_at or not self.slots.slow_start:
            self.slots.on_success()  # the ramp after a pause counts only its own

    def _ramp_on(self, rtt: float) -> None:
        """In slow start with nothing else to pace by, spread each round trip's sends
        over the round trip, so the doubling never leaves as one burst."""
        self._rtt = rtt if self._rtt is None else 0.8 * self._rtt + 0.2 * rtt
        if not self.slots.slow_start or self.buckets:
            self.ramp = None
            return
        rate = max(1.0, self.slots.limit) / max(self._rtt, 1e-3)
        if self.ramp is None:
            self.ramp = TokenBucket(rate, self.clock, learned=True)
        else:
            self.ramp.set_rate(rate)

    def _on_throttle(self, outcome: Outcome, sent_at: float, in_flight: int,
                     guided: bool = False) -> None:
        """A 429 means "too fast": adapt the rate unless a budget or headers set it.
        An overload (529) means "too busy": halve the requests in flight."""
        ramp, self.ramp = self.ramp, None  # a limit signal: slow start is over
        if outcome == Outcome.OVERLOADED:
            self.slots.on_throttle()
            return
        ramping = self.slots.slow_start
        self.slots.on_refused(in_flight, costly=guided)
        if self.slots.cut and not ramping:
            return  # the window's own excess (a cap in flight), not the rate's
        if self._adapts():
            bucket = self.adaptive.on_throttle(sent_at, self.streak,
                                               ramp.rate if ramp is not None else None,
                                               guided)
            if bucket is not None:
                self.buckets["rpm"] = bucket

    def _adapts(self) -> bool:
        """Only 429s tell the rate: no budget, no headers (they pace instead)."""
        rpm = self.buckets.get("rpm")
        return not self.ceilings and (rpm is None or rpm.learned and rpm in (
            self.adaptive.bucket, self.adaptive.provisional))
