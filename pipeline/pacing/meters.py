"""The meters the limiter is composed of; clock and sleep are injected, nothing knows HTTP.

* ``TokenBucket``: a pacer, continuously refilled, with almost no burst (one request,
  plus a few milliseconds of credit so a late timer costs no throughput): a paced run
  never sends more than its rate in *any* interval, so it holds against a sliding or a
  fixed window as well as against a bucket. It may go into debt, so reconciling an
  under-estimate never blocks.
* ``PauseGate``: after a 429 every worker waits, not only the one refused.
* ``AdaptiveConcurrency``: the cap on requests in flight. It starts at one and doubles
  per round trip (slow start) until the first limit signal, so a run that knows nothing
  yet never fires its whole concurrency into an unknown limit; an overload (529) halves
  it and successes raise it again (AIMD).
* ``AdaptiveRate``: a request rate found by probing, when neither the user nor headers
  give one: cut on 429s, raised slowly on success.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_GENTLE = 64.0  # round trips of a found cap in flight before probing for one more place
PACE_SHARE = 0.98   # of a known limit: room for one request's cost and timing jitter
_CREDIT_SECONDS = 0.05  # burst beyond one unit: absorbs a late timer, not a window's quota


class TokenBucket:
    def __init__(self, rate: float, clock: Clock, learned: bool = False) -> None:
        self.clock = clock
        self.learned = learned
        self.rate = rate
        self.capacity = self._capacity(rate)
        self.level = self.capacity
        self._t = clock()

    @staticmethod
    def _capacity(rate: float) -> float:
        return 1.0 + rate * _CREDIT_SECONDS

    def set_rate(self, rate: float) -> None:
        self._refill()
        self.rate = rate
        self.capacity = self._capacity(rate)
        self.level = min(self.level, self.capacity)

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    def wait_time(self, cost: float) -> float:
        """Seconds until ``cost`` may be taken (a cost above the capacity needs a full one)."""
        self._refill()
        need = min(cost, self.capacity)
        # A deficit within rounding is none: else a clock that cannot resolve the wait
        # (a large timestamp plus a tiny sleep) would have it wait for ever.
        short = need - self.level
        return 0.0 if short <= 1e-9 * max(1.0, need) else short / self.rate

    def take(self, cost: float) -> None:
        self._refill()
        self.level -= cost

    def credit(self, amount: float) -> None:
        """Reconcile: a refund (positive) or a further charge (negative)."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    def drain(self) -> None:
        """Start from empty: after a cut no burst may follow."""
        self._refill()
        self.level = min(self.level, 0.0)


class PauseGate:
    """Workers ``await gate.wait()`` before each request; ``pause(s)`` holds them all."""

    def __init__(self, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._until = 0.0
        self.started = -1e18  # when the current (or last) pause began
        self.pauses = 0

    def pause(self, seconds: float) -> None:
        now = self._clock()
        until = now + seconds
        if until > self._until:
            if self._until <= now:
                self.started = now
            self._until = until
            self.pauses += 1

    @property
    def until(self) -> float:
        return self._until

    @property
    def remaining(self) -> float:
        return max(0.0, self._until - self._clock())

    async def wait(self) -> None:
        # Loop: another worker may extend the pause while this one sleeps.
        while (left := self._until - self._clock()) > 0:
            await self._sleep(left)


class AdaptiveConcurrency:
    """At most ``limit`` requests in flight: slow start, then AIMD on overload."""

    def __init__(self, maximum: int, clock: Clock, cooldown: float = 1.0,
                 initial: int = 1) -> None:
        self.maximum = maximum
        self.limit = float(min(initial, maximum))
        self.slow_start = self.limit < maximum  # until the first limit signal
        self.in_flight = 0
        self._clock = clock
        self._cooldown = cooldown
        self._last_cut = -1e9
        self._resume_at = float(maximum)  # where a slow start after a pause ends
        self.capped = False  # a refusal came with the window full
        self._restarted = False  # slow start again after a pause (not the first one)
        self.cut = False  # the last refusal cut the window: it took the excess away
        self._cap_at = 0  # what it was last cut to
        self._gentle = _GENTLE  # then growing by one takes this many round trips
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self) -> None:
        while self.in_flight >= max(1, int(self.limit)):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                if fut.done() and not fut.cancelled():
                    self._wake()  # woken, then cancelled: pass the wake-up on
                raise
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        free = max(1, int(self.limit)) - self.in_flight
        for fut in self._waiters[:max(0, free)]:
            if not fut.done():
                fut.set_result(None)

    def on_success(self) -> None:
        if self.slow_start:  # +1 per success: doubles every round trip
            self.limit = min(self._resume_at, self.limit + 1.0)
            self.slow_start = self.limit < self._resume_at
            self._restarted = self._restarted and self.slow_start
        elif self.limit < self.maximum:
            # After a refusal at a full window, probe for one more place only gently,
            # and ever more rarely: every probe that finds the cap again costs a 429.
            step = 1.0 / (self._gentle * self.limit) if self.capped else 1.0 / self.limit
            self.limit = min(self.maximum, self.limit + step)
        self._wake()

    def on_signal(self) -> None:
        """A limit is known now (headers, budgets): other meters pace; stop ramping."""
        if self.slow_start:
            self.slow_start = False
            self._resume_at = float(self.maximum)
        self._wake()

    def on_refused(self, in_flight: int, costly: bool = False) -> None:
        """A 429 for a request sent with ``in_flight`` in flight (itself included). If
        that filled the window, the server may count what is in flight: one fewer (and
        ``cut`` says so). The window at the end of slow start is such a case too: it
        only ever grew. A refusal again at a window already cut to is the rate's.
        ``costly``: the refusal asked the pool to wait; probing for the cap then costs a
        pause each time, so it is done four times as rarely."""
        self.cut = False
        if self._restarted:
            return  # ramping again after a pause: the pause goes on, not a new cap
        # Refused again at (or below) a window already cut to: not the window's fault.
        if self.slow_start or (in_flight >= int(self.limit) and in_flight > self._cap_at):
            if self.capped:  # the cap was found again: probe for it half as often
                self._gentle = min(4096.0, 2 * self._gentle)
            if costly:
                self._gentle = max(self._gentle, 4 * _GENTLE)
            self.limit = float(max(1, min(self.limit, in_flight - 1)))
            self._cap_at = int(self.limit)
            self.capped = self.cut = True
        self.on_signal()

    def restart(self) -> None:
        """After a pool-wide pause: one request first, then ramp back to where it was,
        so the end of a pause is not the whole pool firing at once."""
        if self.limit > 1:
            # Paused again while ramping back: ramp back to where it was before that.
            self._resume_at = max(self._resume_at, self.limit) if self._restarted else self.limit
            self.limit = 1.0
            self.slow_start = self._restarted = True

    def on_throttle(self) -> None:
        now = self._clock()
        if now - self._last_cut >= self._cooldown:  # one cut per burst of 529s
            self._last_cut = now
            self.slow_start = False
            self.limit = max(1.0, self.limit / 2)


_EVIDENCE = 5  # accepted requests a measurement needs
_OUTAGE = 2.0  # seconds with fewer accepted than that: an outage, not a rate


class _Tally:
    """Requests sent since ``start``, and how many of them were refused."""

    def __init__(self, start: float | None = None) -> None:
        self.start, self.sent, self.refused = start, 0, 0

    def accepted(self, now: float) -> float:
        assert self.start is not None
        return (self.sent - self.refused) / max(1e-9, now - self.start)

    def __add__(self, other: _Tally) -> _Tally:
        out = _Tally(self.start if self.start is not None else other.start)
        out.sent, out.refused = self.sent + other.sent, self.refused + other.refused
        return out


class AdaptiveRate:
    """A request rate found from 429s alone, when neither the user nor headers give one.

    The run is cut into cycles, each ending when a refusal episode is over: refusals
    began, the pool paused and probed, and now a request sent since then came back
    ok. A window that was used up has turned or aged out by then, and every limiter
    kind (bucket, sliding or fixed window, cap in flight) has accepted, over the cycle
    and the one before, what it sustains, whatever it refused in between, as long as
    the client pushed harder than that. So at the end of each cycle:

    * ``top``, the rate deemed at the limit, is what was accepted per second; when
      the client was hardly refused (it was probing slowly from below) no less than
      ``backoff`` of the rate that started the episode, and never more than that rate;
    * the rate restarts at ``cut`` of ``top``, climbs back to it within ``recover``
      seconds of sending (fast at first, flattening near it, as TCP CUBIC does), then
      probes beyond slowly, by ``probe`` of it per second of sending: a window hides
      an excess until it is used up, so probing faster would overshoot it.

    The first cycle ends slow start. Its refusal may come from a burst a fresh limiter
    let through (then the average since the first request is the measure: it includes
    the wait that followed) or from a cap in flight (then the ramp's own rate is: the
    average includes the ramp). What follows the refusal tells them apart: a limiter
    that let a burst through goes on refusing; a cap in flight does not, once the
    window is down to it. Until then, half the ramp's rate paces the pool.
    """

    def __init__(self, clock: Clock, cut: float = 0.9, backoff: float = 0.9,
                 recover: float = 2.0, probe: float = 0.02, search: float = 20.0) -> None:
        self.clock = clock
        self.cut, self.backoff, self.recover, self.probe = cut, backoff, recover, probe
        self.search = search  # seconds of sending beyond ``top`` to double it
        self.floor = 0.05  # requests per second: never slower than this
        self.bucket: TokenBucket | None = None  # the pacer, once the first cycle ended
        self.provisional: TokenBucket | None = None  # paces until then
        self.top = 0.0
        self._low = 0.0
        self._cycle = _Tally()
        self._previous = _Tally()
        self._since_exit: _Tally | None = None  # from the end of slow start
        self._episode: float | None = None  # when the current refusal episode began
        self._episode_rate = 0.0
        self._guided = False  # the episode's refusals said how long to wait
        self._live = 0.0  # seconds of sending since the rate was last set
        self._t = clock()

    def rate_at(self, dt: float) -> float:
        """The rate after ``dt`` seconds of sending since it was last set."""
        if dt < self.recover:
            return self.top - (self.top - self._low) * (1 - dt / self.recover) ** 3
        beyond = dt - self.recover
        # Slowly at first; ever faster if no refusal comes (the limit was found too low).
        return self.top * (1 + self.probe * beyond + (beyond / self.search) ** 3)

    def on_sent(self) -> None:
        if self._cycle.start is None:
            self._cycle.start = self.clock()
        self._cycle.sent += 1
        if self._since_exit is not None:
            self._since_exit.sent += 1

    def on_throttle(self, sent_at: float, streak: int = 1, ramp: float | None = None,
                    guided: bool = False) -> TokenBucket | None:
        """A refusal; ``streak`` counts the episode's refusals so far, ``ramp`` is the
        slow start's rate if it ends with this refusal. Returns the provisional pacer
        when it makes one."""
        self._cycle.refused += 1
        since = self._since_exit
        if since is not None and since.start is not None and sent_at >= since.start:
            since.refused += 1
        if self._episode is None:
            self._episode = self.clock()
            self._episode_rate = self.bucket.rate if self.bucket is not None else (ramp or 0.0)
            self._guided = guided
        if guided:
            return None  # the server's wait slows the pool; the cycle's end decides more
        pacer = self.bucket or self.provisional
        if pacer is not None and streak <= 2:
            # Slower at once, and again at a second refusal in a row (the pool pauses
            # only at a third): the cycle's end says how slow. Before the first cycle
            # ended, the slow start's rate is all that is known, and refusals that go
            # on say it is far too high: halve it.
            share = self.cut if self.bucket is not None else 0.5
            pacer.set_rate(max(self.floor, share * pacer.rate))
            pacer.drain()
        if self.bucket is None and self.provisional is None and ramp:
            self._since_exit = _Tally(self.clock())
            self.provisional = TokenBucket(0.5 * ramp, self.clock, learned=True)
            self.provisional.drain()
            return self.provisional
        return None

    def on_success(self, sent_at: float) -> TokenBucket | None:
        """An answer; returns the pacer when it ends a cycle (a new rate is set)."""
        now = self.clock()
        if self.bucket is not None and self._episode is None:
            # Only time spent sending counts: a pause or a used-up window is no
            # evidence that a higher rate would pass. Nor is an answer while refusals
            # go on (to requests sent before them): the cut holds until the cycle ends.
            self._live += min(now - self._t, 2.0 / self.bucket.rate)
            self.bucket.set_rate(self.rate_at(self._live))
        self._t = now
        if self._episode is None or sent_at < self._episode or self._cycle.start is None:
            return None
        top = self._measure(now)
        if top is None:
            return None
        if math.isnan(top):  # nothing to measure (an outage, or waits that do): afresh
            self._previous, self._cycle, self._episode = _Tally(), _Tally(now), None
            self._since_exit = None
            return None
        self.top = max(self.floor, top)
        self._low = max(self.floor, self.cut * self.top)
        self._previous, self._cycle, self._episode = self._cycle, _Tally(now), None
        self._since_exit, self._live = None, 0.0
        if self.bucket is None:
            self.bucket = self.provisional or TokenBucket(self._low, self.clock, learned=True)
        self.bucket.set_rate(self._low)
        self.bucket.drain()  # paced from here on, not with a fresh burst
        return self.bucket

    def _measure(self, now: float) -> float | None:
        """The rate deemed at the limit at the end of a cycle: None when there is not
        enough evidence yet, NaN when the cycle holds none (nothing was accepted)."""
        span = self._previous + self._cycle
        if now <= (span.start or now):
            return None
        if self._guided and span.sent >= _EVIDENCE and span.refused <= 0.25 * span.sent:
            # The server said how long to wait, the pool waited, and it seldom refused:
            # its waits do the pacing (random refusals do not scale with the rate).
            return math.nan
        if span.sent - span.refused < _EVIDENCE:
            # Barely anything accepted. For seconds: a storm of 429s, not a rate (a rate
            # limiter lets its rate through); no rate is made up from it. Briefly: wait
            # for more evidence.
            outage = self.bucket is None and now - (span.start or now) >= _OUTAGE
            return math.nan if outage else None
        top = span.accepted(now)
        after = self._since_exit
        if self.bucket is None and after is not None:  # the first cycle
            if after.sent < _EVIDENCE:
                return None
            if after.refused <= 0.1 * after.sent:  # a cap in flight: the ramp's rate
                top = max(top, after.accepted(now), self.backoff * self._episode_rate)
        elif self.bucket is not None and (
                (span.refused <= 0.1 * span.sent and top >= 0.5 * self._episode_rate)
                or self._cycle.refused >= 2 * (self._cycle.sent - self._cycle.refused)):
            # Hardly refused while sending near the pace (probing slowly from below), or
            # this cycle was nothing but a wait (a window used up, or the server refusing
            # everything for a while): the rate that led into it was a little too much.
            # Far below the pace, pauses held the pool: what was accepted is the measure.
            top = max(top, self.backoff * self._episode_rate)
        return min(top, self._episode_rate) if self._episode_rate > 0 else top
