"""When to send a failed row again: backoff that grows step by step, server waits first.

* Failures count against ``retries``, except rate limiting (429, 529): a row refused
  for the rate waits and goes again until it has waited ``max_rate_wait`` seconds in
  total, however many refusals that takes.
* The n-th backoff waits ``uniform(c/2, c)`` with ``c = min(cap, base * 2**(n-1))``:
  jitter within each step spreads a burst of failed workers, and since a step never
  waits less than the whole step before it, one row's retries always slow down.
* ``Retry-After`` is honoured when it is positive and finite, up to ``max_server_wait``;
  0, negative or unparseable is no guidance, so the backoff applies (never a
  zero-delay repetition).

Pure: randomness is injected, so schedules are exact in tests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5          # attempts after the first, for failures other than the rate
    base: float = 1.0         # first backoff ceiling, seconds
    cap: float = 60.0         # no backoff ceiling above this
    max_server_wait: float = 600.0  # a Retry-After beyond this is not honoured as given
    max_rate_wait: float = 1800.0   # seconds one row may wait in total for the rate limit
    rand: Callable[[], float] = field(default=random.random, compare=False)

    def may_retry(self, attempts_done: int) -> bool:
        return attempts_done <= self.retries

    def backoff(self, step: int) -> float:
        """Delay before retry ``step`` (1 = the first): within the upper half of its
        ceiling, so each step waits at least as long as any earlier one could."""
        if step <= 0:
            return 0.0
        ceiling = min(self.cap, self.base * 2.0 ** min(step - 1, 60))
        return ceiling * (0.5 + 0.5 * self.rand())

    def server_wait(self, retry_after: float | None) -> float | None:
        """A usable server-directed wait, capped; None when it gives no guidance."""
        if retry_after is None or not math.isfinite(retry_after) or retry_after <= 0:
            return None
        return min(retry_after, self.max_server_wait)

    def next_delay(self, attempts_done: int, retry_after: float | None = None) -> float:
        """Delay before attempt ``attempts_done + 1`` after a failure."""
        wait = self.server_wait(retry_after)
        return self.backoff(attempts_done) if wait is None else wait

    def pool_delay(self, streak: int, retry_after: float | None = None) -> float:
        """How long the whole pool pauses after the ``streak``-th refusal in a row of
        the run: as ``rate_delay``, but growing by half per step, not doubling. A
        window that is used up opens again at its reset, which only probing finds;
        the slower growth overshoots that moment by less, for a probe or two more."""
        wait = self.server_wait(retry_after)
        steps = streak - 1 if wait is not None else streak
        grown = 0.0
        if steps > 0:
            ceiling = min(self.cap, self.base * 1.5 ** min(steps - 1, 100))
            grown = ceiling * (0.75 + 0.25 * self.rand())
        return grown if wait is None else max(wait, grown)

    def rate_delay(self, step: int, retry_after: float | None = None) -> float:
        """Delay after the ``step``-th rate-limit refusal in a row: the server's wait as
        given the first time, and from the second on never less than the backoff of
        the step before (a server that keeps saying "in 1 s" and keeps refusing is
        slowed down too); without guidance, the backoff of the step."""
        wait = self.server_wait(retry_after)
        if wait is None:
            return self.backoff(step)
        return max(wait, self.backoff(step - 1))
