"""Pacing requests to the rate limit the user pays for, composed from small meters.

* ``TokenBucket``: continuously refilled (no bursts at the top of a minute), with a
  burst of about one second; it may go into debt so reconciliation never blocks.
  One per budget: requests (RPM), tokens (TPM), input (ITPM) and output (OTPM).
* Budgets come from the user (``--rpm`` …) or are learned from the server's
  ``x-ratelimit-*`` / ``anthropic-ratelimit-*`` headers on every response: a bucket
  that is ``limit - remaining`` short and full again in ``reset`` seconds refills at
  ``(limit - remaining) / reset`` per second, whatever the window length.
* Token costs are estimated before sending (image + prompt + ``max_tokens``
  reserved) and reconciled with the usage the server reports, so estimates never drift.
* ``AdaptiveConcurrency``: the cap on requests in flight, lowered multiplicatively on a
  429/overload and raised additively on success (AIMD), so a run with no budget and
  no headers converges near what the server accepts.
* ``PauseGate``: after a 429 with ``Retry-After`` every worker waits, not only one.

Clock and sleep are injected; nothing here knows of HTTP, images or files.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from ..errors import parse_duration

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
_BURST_SECONDS = 1.0


class PauseGate:
    """Workers ``await gate.wait()`` before each request; ``pause(s)`` holds them all."""

    def __init__(self, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._until = 0.0
        self.pauses = 0

    def pause(self, seconds: float) -> None:
        until = self._clock() + seconds
        if until > self._until:
            self._until = until
            self.pauses += 1

    @property
    def remaining(self) -> float:
        return max(0.0, self._until - self._clock())

    async def wait(self) -> None:
        # Loop: another worker may extend the pause while this one sleeps.
        while (left := self._until - self._clock()) > 0:
            await self._sleep(left)


class TokenBucket:
    def __init__(self, rate: float, clock: Clock, learned: bool = False) -> None:
        self.clock = clock
        self.learned = learned
        self.rate = rate
        self.capacity = max(1.0, rate * _BURST_SECONDS)
        self.level = self.capacity
        self._t = clock()

    def set_rate(self, rate: float) -> None:
        self._refill()
        self.rate = rate
        self.capacity = max(1.0, rate * _BURST_SECONDS)
        self.level = min(self.level, self.capacity)

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    def wait_time(self, cost: float) -> float:
        """Seconds until ``cost`` may be taken (a cost above the burst needs a full bucket)."""
        self._refill()
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float) -> None:
        self._refill()
        self.level -= cost

    def credit(self, amount: float) -> None:
        """Reconcile: a refund (positive) or a further charge (negative)."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    def cap(self, remaining: float) -> None:
        """The server says fewer are left than we thought: believe it."""
        self._refill()
        self.level = min(self.level, remaining)


class AdaptiveConcurrency:
    """At most ``limit`` requests in flight; AIMD on throttling signals."""

    def __init__(self, maximum: int, clock: Clock, cooldown: float = 1.0) -> None:
        self.maximum = maximum
        self.limit = float(maximum)
        self.in_flight = 0
        self._clock = clock
        self._cooldown = cooldown
        self._last_cut = -1e9
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
        if self.limit < self.maximum:
            self.limit = min(self.maximum, self.limit + 1.0 / self.limit)
            self._wake()

    def on_throttle(self) -> None:
        now = self._clock()
        if now - self._last_cut >= self._cooldown:  # one cut per burst of 429s
            self._last_cut = now
            self.limit = max(1.0, self.limit / 2)


class AdaptiveRate:
    """A request rate found by probing when neither user nor headers give one.

    The first 429 (once a few requests have succeeded) sets the rate to half of what
    the server accepted over the last ``span`` seconds, with an empty bucket so no
    burst follows. A later 429 for a request sent after the last cut (plus a settling
    moment; those sent before were paced at the old rate and say nothing new) halves
    the rate if it comes within ``span`` of that cut, else cuts it to ``cut`` of
    itself, and never leaves it above what the server accepted. Success raises the
    rate by ``gain`` per second, compounding, so it probes back up to the limit and
    oscillates just under it.
    """

    def __init__(self, clock: Clock, cut: float = 0.8, gain: float = 0.1,
                 span: float = 1.0) -> None:
        self.clock = clock
        self.cut, self.gain, self.span = cut, gain, span
        self.settle = 0.1  # the server's bucket needs a moment to refill after a cut
        self.bucket: TokenBucket | None = None
        self._ok: deque[float] = deque()
        self._last_cut = -1e9
        self._t = clock()

    def on_success(self) -> None:
        now = self.clock()
        self._ok.append(now)
        while self._ok and self._ok[0] < now - self.span:
            self._ok.popleft()
        if self.bucket is not None:
            self.bucket.set_rate(self.bucket.rate * (1 + self.gain * (now - self._t)))
        self._t = now

    def on_throttle(self, sent_at: float) -> TokenBucket | None:
        now = self.clock()
        if sent_at < self._last_cut + self.settle:
            return None
        previous_cut, self._last_cut, self._t = self._last_cut, now, now
        while self._ok and self._ok[0] < now - self.span:
            self._ok.popleft()
        accepted = len(self._ok) / self.span
        if self.bucket is None:
            if len(self._ok) < 5:  # no evidence of a rate yet: the shared pause must do
                self._last_cut = previous_cut
                return None
            self.bucket = TokenBucket(0.5 * accepted, self.clock, learned=True)
            self.bucket.level = 0.0  # start paced, not with a fresh burst
        else:
            # Still rejected soon after a cut: far above the limit, so halve (the
            # slow 0.8 cut is for probing just above it).
            cut = 0.5 if now - previous_cut < self.span else self.cut
            rate = self.bucket.rate * cut
            if len(self._ok) >= 5:  # enough evidence of what the server accepts
                rate = min(rate, 0.95 * accepted)
            self.bucket.set_rate(max(0.05, rate))
        return self.bucket


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


# header kind → bucket name; OpenAI, Anthropic, and LiteLLM's re-emitted copies.
_HEADER_KINDS = {"requests": "rpm", "tokens": "tpm", "input-tokens": "itpm",
                 "output-tokens": "otpm"}


def read_limits(headers: Mapping[str, str], now: float | None = None
                ) -> dict[str, tuple[float, float, float]]:
    """{bucket: (limit, remaining, seconds until full)} from rate-limit headers."""
    out: dict[str, tuple[float, float, float]] = {}
    for kind, bucket in _HEADER_KINDS.items():
        for pattern in ("x-ratelimit-{}-" + kind, "anthropic-ratelimit-" + kind + "-{}",
                        "llm_provider-x-ratelimit-{}-" + kind):
            lim = headers.get(pattern.format("limit"))
            rem = headers.get(pattern.format("remaining"))
            reset = headers.get(pattern.format("reset"))
            if lim is None or rem is None or reset is None:
                continue
            try:
                seconds = parse_duration(reset, time.time() if now is None else now)
                vals = (float(lim), float(rem), seconds)
            except ValueError:
                continue
            if vals[2] is not None:
                out[bucket] = vals  # type: ignore[assignment]
                break
    return out


class Limiter:
    """All meters together: pause gate → concurrency slot → buckets, then reconcile."""

    def __init__(self, budgets: Budgets, concurrency: int, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.clock = clock
        self.sleep = sleep
        self.gate = PauseGate(clock, sleep)
        self.slots = AdaptiveConcurrency(concurrency, clock)
        self.buckets: dict[str, TokenBucket] = {
            name: TokenBucket(per_minute / 60.0, clock)
            for name, per_minute in vars(budgets).items() if per_minute}
        self.adaptive = AdaptiveRate(clock)
        self.input_scale = 1.0  # learned ratio of reported to estimated input tokens
        self._pacer = asyncio.Lock()
        self.throttled = 0

    @staticmethod
    def _costs(p: Permit) -> dict[str, float]:
        return {"rpm": 1.0, "tpm": p.cost_in + p.cost_out, "itpm": p.cost_in,
                "otpm": p.cost_out}

    async def acquire(self, est_in: int, est_out: int) -> Permit:
        permit = Permit(round(est_in * self.input_scale), est_out, est_in)
        await self.gate.wait()
        await self.slots.acquire()
        try:
            # One pacer at a time: waiters queue on the lock instead of all waking
            # together when the bucket refills (no thundering herd).
            async with self._pacer:
                costs = self._costs(permit)
                while True:
                    await self.gate.wait()
                    wait = max((b.wait_time(costs[n]) for n, b in self.buckets.items()),
                               default=0.0)
                    if wait <= 0:
                        break
                    await self.sleep(wait)
                for name, bucket in self.buckets.items():
                    bucket.take(costs[name])
        except BaseException:
            self.slots.release()
            raise
        permit.sent_at = self.clock()
        return permit

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn live limits from any response's rate-limit headers."""
        for name, (limit, remaining, seconds) in read_limits(headers).items():
            bucket = self.buckets.get(name)
            if (bucket is None or bucket.learned) and seconds > 0 and limit > remaining:
                rate = (limit - remaining) / seconds
                if bucket is None:
                    bucket = self.buckets[name] = TokenBucket(rate, self.clock, learned=True)
                else:
                    bucket.set_rate(0.7 * bucket.rate + 0.3 * rate)
            if bucket is not None:
                bucket.cap(remaining)

    def finish(self, permit: Permit, outcome: str, prompt_tokens: int | None = None,
               completion_tokens: int | None = None) -> None:
        """Release the slot and reconcile the token buckets with what really happened.

        ``outcome``: "ok", "throttled" (429) or "overloaded" (529/503): the request was
        not served, or "error" (served, but no usable usage).
        """
        self.slots.release()
        refund = {"tpm": 0.0, "itpm": 0.0, "otpm": 0.0}
        if outcome in ("throttled", "overloaded"):
            self.throttled += 1
            self._on_throttle(outcome, permit.sent_at)
            refund = {"tpm": permit.cost_in + permit.cost_out, "itpm": permit.cost_in,
                      "otpm": permit.cost_out}
        elif prompt_tokens is not None and completion_tokens is not None:
            refund = {"tpm": permit.cost_in + permit.cost_out - prompt_tokens - completion_tokens,
                      "itpm": permit.cost_in - prompt_tokens,
                      "otpm": permit.cost_out - completion_tokens}
            if permit.estimate_in > 0 and prompt_tokens > 0:
                ratio = prompt_tokens / permit.estimate_in
                self.input_scale = 0.9 * self.input_scale + 0.1 * ratio
        else:
            refund["otpm"] = refund["tpm"] = permit.cost_out  # reserved output never came
        for name, amount in refund.items():
            if name in self.buckets and amount:
                self.buckets[name].credit(amount)
        if outcome == "ok":
            self.slots.on_success()
            self.adaptive.on_success()

    def _on_throttle(self, outcome: str, sent_at: float) -> None:
        """A 429 means "too fast": adapt the rate unless a budget already sets it.
        An overload (529/503) means "too busy": halve the requests in flight."""
        if outcome == "overloaded":
            self.slots.on_throttle()
            return
        rpm = self.buckets.get("rpm")
        if rpm is None or rpm is self.adaptive.bucket:
            bucket = self.adaptive.on_throttle(sent_at)
            if bucket is not None:
                self.buckets["rpm"] = bucket
