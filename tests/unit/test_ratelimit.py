"""Specification of pipeline/ratelimit.py: PauseGate holds the whole worker pool.

A fake clock and a fake sleep are injected: sleeping advances the fake clock, so no
test waits on the wall clock and every duration is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pipeline.pacing.limiter import PauseGate


class FakeTime:
    """``now`` only moves when someone sleeps; ``sleeps`` records every requested sleep."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[int], None] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        called_at = self.now
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would
        # Concurrent sleepers started at the same instant share one timeline.
        self.now = max(self.now, called_at + seconds)


def gate_with(t: FakeTime) -> PauseGate:
    return PauseGate(clock=t.clock, sleep=t.sleep)


async def test_wait_without_a_pause_does_not_sleep() -> None:
    t = FakeTime()
    await gate_with(t).wait()
    assert t.sleeps == []


async def test_pause_holds_a_waiter_for_exactly_the_pause() -> None:
    t = FakeTime(start=50.0)
    g = gate_with(t)
    g.pause(5.0)
    await g.wait()
    assert t.sleeps == [5.0]
    assert t.now == 55.0


async def test_wait_after_the_pause_has_elapsed_does_not_sleep() -> None:
    t = FakeTime()
    g = gate_with(t)
    g.pause(5.0)
    t.now += 5.0
    await g.wait()
    assert t.sleeps == []


async def test_wait_sleeps_only_what_is_left_of_the_pause() -> None:
    t = FakeTime()
    g = gate_with(t)
    g.pause(10.0)
    t.now += 4.0
    await g.wait()
    assert t.sleeps == [6.0]


def test_remaining_counts_down_with_the_clock_and_stops_at_zero() -> None:
    t = FakeTime()
    g = gate_with(t)
    assert g.remaining == 0.0
    g.pause(3.0)
    assert g.remaining == 3.0
    t.now += 1.0
    assert g.remaining == 2.0
    t.now += 10.0
    assert g.remaining == 0.0


def test_shorter_pause_does_not_shorten_a_longer_one() -> None:
    t = FakeTime()
    g = gate_with(t)
    g.pause(10.0)
    g.pause(2.0)
    assert g.remaining == 10.0


def test_longer_pause_extends_the_current_one() -> None:
    t = FakeTime()
    g = gate_with(t)
    g.pause(2.0)
    t.now += 1.0
    g.pause(5.0)
    assert g.remaining == 5.0


def test_pauses_counts_only_pauses_that_extend_the_hold() -> None:
    t = FakeTime()
    g = gate_with(t)
    g.pause(10.0)
    g.pause(3.0)   # inside the current pause: not counted
    g.pause(12.0)  # extends: counted
    assert g.pauses == 2


async def test_pause_extended_while_waiting_keeps_the_waiter_held() -> None:
    t = FakeTime()
    g = gate_with(t)
    g.pause(2.0)
    # Another worker learns of a longer wait while this one sleeps.
    t.on_sleep = lambda n: g.pause(8.0) if n == 1 else None
    start = t.now
    await g.wait()
    assert t.sleeps == [2.0, 6.0]
    assert t.now == start + 8.0


async def test_one_pause_holds_every_waiter_in_the_pool() -> None:
    t = FakeTime()
    g = gate_with(t)
    g.pause(4.0)
    released: list[float] = []

    async def worker() -> None:
        await g.wait()
        released.append(t.now)

    await asyncio.gather(*(worker() for _ in range(5)))
    assert released == [t.now] * 5
    assert min(released) >= 1004.0
    assert t.sleeps == [4.0] * 5


async def test_gate_default_construction_uses_real_time_without_pausing() -> None:
    g = PauseGate()
    assert g.remaining == 0.0
    await g.wait()  # returns at once: nothing to wait for
    assert g.pauses == 0
