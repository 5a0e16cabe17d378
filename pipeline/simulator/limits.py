"""Server-side rate limits of the local gateway SIMULATOR, and how their times are written.

Owns the continuously refilled token buckets behind `--rpm` / `--tpm` (docs/protocol.md §5.2,
5.3): `TokenBucket`, `RateLimits` (a request takes from every bucket or from none) and
the `Refusal` it returns, plus the duration texts the limits are reported in:
`go_duration` for OpenAI's `x-ratelimit-reset-*` headers and `retry_after_text` for
`Retry-After` and the "try again in" messages.

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
The HTTP side lives in `pipeline.simulator`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import SimConfig

__all__ = ["RateLimits", "Refusal", "TokenBucket", "go_duration", "retry_after_text"]


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


def retry_after_text(seconds: float) -> str:
    """Seconds rounded up to 0.1 s, e.g. "1.2" or "2" (the SDKs parse floats)."""
    tenths = max(1, math.ceil(round(seconds * 10, 6)))
    return str(tenths // 10) if tenths % 10 == 0 else f"{tenths / 10:.1f}"
