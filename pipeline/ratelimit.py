"""Shared pacing of requests: a pool-wide pause that every worker honours.

When the server answers 429 with a Retry-After, one worker learning it must slow the
whole pool, not just its own row: otherwise the other workers keep hammering a server
that already said "wait". Clock and sleep are injected so tests are exact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class PauseGate:
    """Workers ``await gate.wait()`` before each request; ``pause(s)`` holds them all."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
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
