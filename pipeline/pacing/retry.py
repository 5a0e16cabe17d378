"""When to send a failed row again: exponential backoff with full jitter, server waits first.

Pure: randomness is injected, so schedules are exact in tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5          # attempts after the first
    base: float = 1.0         # first backoff ceiling, seconds
    cap: float = 60.0         # no backoff ceiling above this
    max_server_wait: float = 600.0  # a Retry-After beyond this is not honoured as given
    rand: Callable[[], float] = field(default=random.random, compare=False)

    def may_retry(self, attempts_done: int) -> bool:
        return attempts_done <= self.retries

    def next_delay(self, attempts_done: int, retry_after: float | None = None) -> float:
        """Delay before attempt ``attempts_done + 1``.

        A server-directed wait (Retry-After) is honoured as given, up to
        ``max_server_wait``; otherwise full jitter, ``uniform(0, min(cap, base * 2**n))``,
        which spreads a burst of failed workers instead of synchronising them.
        """
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_server_wait)
        ceiling = min(self.cap, self.base * (2 ** max(0, attempts_done - 1)))
        return self.rand() * ceiling
