"""Server-side rate limits of the local gateway SIMULATOR, and how their times are written.

Four limiter kinds, chosen by `SimConfig.limiter` (`--limiter`), because real servers
count differently and a client must hold its rate against each (docs/protocol.md §5.2, §5.3):

* `bucket`: continuously refilled token buckets (OpenAI, Anthropic): capacity `limit`,
  refilled at limit/window per second, so a full bucket allows a burst of `limit`;
* `sliding`: a sliding log: at most `limit` in any `window` seconds;
* `fixed`: a fixed window aligned to the clock (many gateways count per clock minute):
  at most `limit` per window, all of it available again when the window turns;
* `concurrency`: at most `max_in_flight` requests being answered at once, no rate.

Each rate meter answers what its headers report, consistently with what it enforces:
`remaining()` and `reset_seconds()` (the time until it is fully replenished if nothing
more is sent, as both providers document `reset`). The concurrency cap enforces no rate,
so it reports no rate-limit headers. `RateLimits` admits a request against every meter
or none and returns a `Ticket`; releasing the ticket gives back the reserved tokens the
request did not use and its place in flight.

`go_duration` and `retry_after_text` write the durations (OpenAI's `x-ratelimit-reset-*`,
`Retry-After` and the "try again in" messages).

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
The HTTP side lives in `simulator.app`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .app import SimConfig

__all__ = [
    "LIMITER_KINDS", "FixedWindow", "Meter", "RateLimits", "Refusal", "SlidingLog", "Ticket",
    "TokenBucket", "go_duration", "retry_after_text",
]  # fmt: skip

LIMITER_KINDS = ("bucket", "sliding", "fixed", "concurrency")
Clock = Callable[[], float]
# A concurrency cap cannot know when a place frees up; this is what gateways commonly say.
CONCURRENCY_RETRY_AFTER = 1.0


class Meter(Protocol):
    limit: int

    def wait_for(self, amount: float) -> float: ...  # seconds until `amount` fits
    def take(self, amount: float) -> Any: ...  # a handle for give_back
    def give_back(self, handle: Any, amount: float) -> None: ...
    def remaining(self) -> float: ...
    def reset_seconds(self) -> float: ...


class TokenBucket:
    """Capacity `limit`, refilled continuously at limit/window per second; starts full."""

    def __init__(self, limit: int, window: float, clock: Clock) -> None:
        self.limit, self.rate, self._clock = limit, limit / window, clock
        self._level, self._at = float(limit), clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(float(self.limit), self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    remaining = level

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level()) / self.rate)

    def add(self, amount: float) -> None:
        self._level = min(float(self.limit), self.level() + amount)

    def take(self, amount: float) -> None:
        self.add(-amount)

    def give_back(self, handle: Any, amount: float) -> None:
        self.add(amount)

    def reset_seconds(self) -> float:
        return (self.limit - self.level()) / self.rate


class SlidingLog:
    """At most `limit` in any `window` seconds: every admission is logged until it ages out."""

    def __init__(self, limit: int, window: float, clock: Clock) -> None:
        self.limit, self.window, self._clock = limit, window, clock
        self._log: deque[list[float]] = deque()  # [admitted at, amount]; at most `limit` long
        self._used = 0.0

    def _expire(self) -> float:
        now = self._clock()
        while self._log and self._log[0][0] <= now - self.window:
            self._used -= self._log.popleft()[1]
        return now

    def remaining(self) -> float:
        self._expire()
        return self.limit - self._used

    def wait_for(self, amount: float) -> float:
        now = self._expire()
        excess = self._used + amount - self.limit
        if excess <= 0:
            return 0.0
        for at, used in self._log:  # oldest first: the room each leaves when it ages out
            excess -= used
            if excess <= 0:
                return max(0.0, at + self.window - now)
        return 0.0  # more than the whole limit: the caller refuses it for good

    def take(self, amount: float) -> list[float]:
        entry = [self._expire(), amount]
        self._log.append(entry)
        self._used += amount
        return entry

    def give_back(self, handle: list[float], amount: float) -> None:
        self._expire()
        if self._log and handle[0] >= self._log[0][0]:  # still in the window
            handle[1] -= amount
            self._used -= amount

    def reset_seconds(self) -> float:
        now = self._expire()
        return self._log[-1][0] + self.window - now if self._log else 0.0


class FixedWindow:
    """At most `limit` per window [k*window, (k+1)*window) of the clock."""

    def __init__(self, limit: int, window: float, clock: Clock) -> None:
        self.limit, self.window, self._clock = limit, window, clock
        self._index, self._used = -1, 0.0

    def _turn(self) -> float:
        now = self._clock()
        index = math.floor(now / self.window)
        if index != self._index:
            self._index, self._used = index, 0.0
        return now

    def _left(self, now: float) -> float:
        return (self._index + 1) * self.window - now

    def remaining(self) -> float:
        self._turn()
        return self.limit - self._used

    def wait_for(self, amount: float) -> float:
        now = self._turn()
        return 0.0 if self._used + amount <= self.limit else self._left(now)

    def take(self, amount: float) -> int:
        self._turn()
        self._used += amount
        return self._index

    def give_back(self, handle: int, amount: float) -> None:
        self._turn()
        if handle == self._index:  # a turned window has forgotten the request
            self._used -= amount

    def reset_seconds(self) -> float:
        now = self._turn()
        return self._left(now) if self._used > 0 else 0.0


_METERS: dict[str, Callable[[int, float, Clock], Meter]] = {
    "bucket": TokenBucket, "sliding": SlidingLog, "fixed": FixedWindow}


@dataclass(frozen=True)
class Refusal:
    kind: str  # "requests" | "tokens" | "concurrency"
    limit: int
    requested: int
    retry_after: float | None  # None: larger than the whole limit, waiting never helps


@dataclass
class Ticket:
    """An admitted request: what it took from each meter, until it is released."""

    handles: dict[str, Any] = field(default_factory=dict)
    in_flight: bool = False


class RateLimits:
    """The requests and tokens meters and the cap in flight; a request takes from all or none."""

    def __init__(self, config: SimConfig, clock: Clock = time.monotonic) -> None:
        self.buckets: dict[str, Meter] = {}  # by header kind; empty for `concurrency`
        self.max_in_flight = config.max_in_flight
        self.in_flight = 0
        if config.limiter in _METERS:
            make = _METERS[config.limiter]
            if config.rpm:
                self.buckets["requests"] = make(config.rpm, config.window, clock)
            if config.tpm:
                self.buckets["tokens"] = make(config.tpm, config.window, clock)

    def admit(self, tokens: int) -> Ticket | Refusal:
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            return Refusal("concurrency", self.max_in_flight, 1, CONCURRENCY_RETRY_AFTER)
        need = {"requests": 1, "tokens": tokens}
        tokens_meter = self.buckets.get("tokens")
        if tokens_meter and tokens > tokens_meter.limit:
            return Refusal("tokens", tokens_meter.limit, tokens, None)
        waits = {kind: meter.wait_for(need[kind]) for kind, meter in self.buckets.items()}
        kind = max(waits, key=waits.__getitem__, default=None)
        if kind is not None and waits[kind] > 0:
            return Refusal(kind, self.buckets[kind].limit, need[kind], waits[kind])
        ticket = Ticket({kind: meter.take(need[kind]) for kind, meter in self.buckets.items()})
        if self.max_in_flight is not None:
            self.in_flight += 1
            ticket.in_flight = True
        return ticket

    def release(self, ticket: Ticket, unused_tokens: int) -> None:
        """The request is answered: give back its place and the tokens it did not use."""
        if ticket.in_flight:
            ticket.in_flight = False
            self.in_flight -= 1
        if "tokens" in ticket.handles and unused_tokens > 0:
            self.buckets["tokens"].give_back(ticket.handles["tokens"], unused_tokens)


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


def retry_after_text(seconds: float) -> str:
    """Seconds rounded up to 0.1 s, e.g. "1.2" or "2" (the SDKs parse floats)."""
    tenths = max(1, math.ceil(round(seconds * 10, 6)))
    return str(tenths // 10) if tenths % 10 == 0 else f"{tenths / 10:.1f}"
