"""Specification of the rate found from bare 429s (pipeline/meters.py ``AdaptiveRate``) and
of the limiter's streak of refusals: no budget, no headers, no Retry-After.

A fake clock drives every schedule. ``send``/``ok``/``refuse`` stand for what the
limiter reports: a permit granted, an answer, a 429.
"""

from __future__ import annotations

import asyncio

import pytest

from pipeline.pacing.limiter import Budgets, Limiter
from pipeline.pacing.meters import AdaptiveRate


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        called_at = self.now
        await asyncio.sleep(0)
        self.now = max(self.now, called_at + seconds)


class Driver:
    """Sends at a given rate and answers each request at once, as the test says."""

    def __init__(self, c: Clock, a: AdaptiveRate) -> None:
        self.c, self.a = c, a

    def ok(self, n: int, every: float) -> None:
        for _ in range(n):
            self.c.now += every
            self.a.on_sent()
            self.a.on_success(self.c.now)

    def refuse(self, ramp: float | None = None) -> None:
        self.a.on_sent()
        self.a.on_throttle(self.c.now, 1, ramp)


def test_there_is_no_rate_before_the_first_refusal() -> None:
    c = Clock()
    a = AdaptiveRate(c)
    Driver(c, a).ok(50, 0.01)
    assert a.bucket is None and a.provisional is None


def test_the_first_refusal_paces_the_pool_at_half_the_slow_starts_rate() -> None:
    c = Clock()
    a = AdaptiveRate(c)
    Driver(c, a).ok(20, 0.1)
    pacer = a.on_throttle(c.now, 1, ramp=40.0)
    assert pacer is a.provisional and pacer is not None
    assert pacer.rate == pytest.approx(20.0) and pacer.level <= 0  # no burst follows
    assert a.bucket is None  # the first cycle has not ended yet


def test_a_limiter_that_let_a_burst_through_is_measured_by_its_average_since_the_start() -> None:
    # A token bucket: 60 at once, then 10 a second. Slow start reached 100/s when refused;
    # after it, more refusals: the average since the first request (the wait included).
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    d.ok(60, 0.02)       # the burst: 60 in 1.2 s
    d.refuse(ramp=100.0)
    for _ in range(4):   # the provisional 50/s is refused, then the pause, then ok
        d.refuse()
    c.now += 4.0
    d.ok(5, 0.1)
    assert a.bucket is not None
    assert a.top == pytest.approx(65 / (c.now - 100.02), rel=0.05)  # ~11, not 50


def test_a_cap_in_flight_is_measured_by_the_slow_starts_rate() -> None:
    # The ramp's average understates a cap, which is full at once: once the window is
    # down to it, nothing more is refused, and the rate just sent at is the measure.
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    d.ok(20, 0.1)        # a slow ramp: 10 a second on average
    d.refuse(ramp=30.0)
    d.ok(10, 1 / 15)     # at the provisional 15/s, all accepted
    assert a.bucket is not None
    assert a.top == pytest.approx(0.9 * 30.0)


def test_a_cycle_ends_only_with_a_success_of_a_request_sent_after_the_refusal() -> None:
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    d.ok(20, 0.1)
    d.refuse(ramp=20.0)
    for _ in range(10):
        c.now += 0.1
        a.on_success(c.now - 5.0)  # answers to requests sent long before: old news
    assert a.bucket is None


def test_a_cycle_is_measured_together_with_the_one_before() -> None:
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    d.ok(20, 0.1)        # the first request is sent at 100.1
    d.refuse(ramp=20.0)
    d.ok(10, 0.1)        # first cycle over: 31 sent, 1 refused
    assert a.bucket is not None
    a.bucket.set_rate(100.0)  # far above what was accepted
    c.now += 0.5
    d.refuse()
    d.ok(1, 0.1)         # the second cycle: one refusal, one answer
    assert a.top == pytest.approx((30 + 1) / (c.now - 100.1))


def test_a_cycle_that_was_only_a_wait_keeps_most_of_the_rate_that_led_into_it() -> None:
    # A window used up until it turns, or the server refusing everything for a while.
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    d.ok(20, 0.1)
    d.refuse(ramp=20.0)
    d.ok(10, 0.1)
    assert a.bucket is not None
    a.bucket.set_rate(10.0)
    for _ in range(30):  # refused for 3 s ...
        c.now += 0.1
        d.refuse()
    d.ok(1, 0.1)         # ... until it turns
    assert a.top == pytest.approx(0.9 * 10.0)  # of the rate that was refused


def test_the_limit_is_never_above_the_rate_that_was_refused() -> None:
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    d.ok(20, 0.1)
    d.refuse(ramp=20.0)
    d.ok(10, 0.1)
    assert a.bucket is not None
    a.bucket.set_rate(3.0)
    d.refuse()
    d.ok(200, 0.001)  # a burst accepted after the refusal says nothing more
    assert a.top <= 3.0 * 1.01


def test_when_hardly_refused_near_the_pace_the_limit_is_most_of_the_refused_rate() -> None:
    # Probing slowly from below: the client's own rate limited what was accepted.
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    d.ok(20, 0.1)
    d.refuse(ramp=20.0)
    d.ok(10, 0.1)
    assert a.bucket is not None
    d.ok(60, 1 / 12)   # accepted at about the pace
    rate = a.bucket.rate
    d.refuse()          # the episode starts at that pace ...
    d.ok(5, 1 / 12)
    assert a.top == pytest.approx(0.9 * rate)  # ... not what the span's average says


def test_far_below_the_pace_what_was_accepted_is_the_measure() -> None:
    # Pauses (the server's Retry-After, say) held the pool well below its pace.
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    d.ok(20, 0.1)
    d.refuse(ramp=20.0)
    d.ok(10, 0.1)
    assert a.bucket is not None
    a.bucket.set_rate(100.0)
    d.ok(40, 0.2)       # 5 a second accepted
    d.refuse()
    d.ok(1, 0.2)
    assert a.top < 10.0


def test_guided_refusals_that_stay_rare_leave_the_rate_to_the_servers_waits() -> None:
    # Random 429s with Retry-After do not scale with the rate: no pace is made of them.
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    for _ in range(5):
        d.ok(9, 0.1)
        a.on_sent()
        a.on_throttle(c.now, 1, None, guided=True)
        c.now += 1.0  # the server's wait
    d.ok(1, 0.1)
    assert a.bucket is None and a.provisional is None


def test_the_rate_climbs_back_within_recover_then_probes_slowly_then_faster() -> None:
    c = Clock()
    a = AdaptiveRate(c, cut=0.9, recover=2.0, probe=0.02, search=20.0)
    a.top, a._low = 10.0, 9.0
    assert a.rate_at(0.0) == pytest.approx(9.0)
    assert a.rate_at(1.0) == pytest.approx(10 - 1 * 0.125)  # fast at first (a cubic)
    assert a.rate_at(2.0) == pytest.approx(10.0)
    assert a.rate_at(7.0) == pytest.approx(10.0 * (1 + 0.1 + 0.25 ** 3))  # ~2 % a second
    assert a.rate_at(22.0) == pytest.approx(10.0 * (1 + 0.4 + 1))  # not refused: faster


def test_only_time_spent_sending_moves_the_rate() -> None:
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    d.ok(20, 0.1)
    d.refuse(ramp=20.0)
    d.ok(10, 0.1)
    assert a.bucket is not None
    before = a.bucket.rate
    c.now += 60.0  # a long pause: no evidence that a higher rate would pass
    d.ok(1, 0.1)
    assert a.bucket.rate < before * 1.1


# --------------------------------------------------------------------------- the streak


async def test_a_burst_of_refusals_is_one_step_of_the_streak() -> None:
    c = Clock()
    lim = Limiter(Budgets(), 8, clock=c, sleep=c.sleep)
    lim.slots.slow_start, lim.slots.limit = False, 8.0
    permits = [await lim.acquire(1, 1) for _ in range(4)]  # all sent before any answer
    for p in permits:
        c.now += 0.001
        lim.finish(p, "throttled")
    assert lim.streak == 1


async def test_the_streak_ends_with_a_success_of_a_request_sent_since_it_began() -> None:
    c = Clock()
    lim = Limiter(Budgets(), 8, clock=c, sleep=c.sleep)
    lim.slots.slow_start, lim.slots.limit = False, 8.0
    old = await lim.acquire(1, 1)
    c.now += 0.1
    lim.finish(await lim.acquire(1, 1), "throttled")
    c.now += 0.1
    lim.finish(await lim.acquire(1, 1), "throttled")
    assert lim.streak == 2
    lim.finish(old, "ok", 1, 1)  # sent before the streak began: old news
    assert lim.streak == 2
    lim.finish(await lim.acquire(1, 1), "ok", 1, 1)
    assert lim.streak == 0


async def test_a_first_unguided_refusal_is_answered_by_the_pace_not_a_pool_pause() -> None:
    c = Clock()
    lim = Limiter(Budgets(), 8, clock=c, sleep=c.sleep)
    lim.slots.slow_start, lim.slots.limit = False, 8.0
    lim.finish(await lim.acquire(1, 1), "ok", 1, 1)
    lim.buckets["rpm"] = lim.adaptive.provisional = \
        lim.adaptive.on_throttle(c.now, 1, ramp=10.0) or lim.adaptive.provisional
    lim.streak = 1
    lim.refused(1.0, guided=False)
    assert lim.gate.remaining == 0.0  # the pace was cut instead
    lim.streak = 2
    lim.refused(1.0, guided=False)
    assert lim.gate.remaining == 0.0  # a second one: the pace is cut again
    lim.streak = 3
    lim.refused(1.0, guided=False)
    assert lim.gate.remaining == 1.0  # refusals go on: a window used up, everyone waits
    lim.refused(3.0, guided=True)
    assert lim.gate.remaining == 3.0  # the server said how long



def test_a_cut_holds_while_answers_to_requests_sent_before_the_refusal_come_back() -> None:
    # Those answers are old news: were the climb to go on with them, the pace would be
    # back where it was refused before the next request leaves, and refusals go on.
    c = Clock()
    a = AdaptiveRate(c)
    d = Driver(c, a)
    d.ok(20, 0.1)
    d.refuse(ramp=20.0)
    d.ok(10, 0.1)
    assert a.bucket is not None
    d.ok(30, 0.1)        # climbing
    climbed = a.bucket.rate
    d.refuse()
    assert a.bucket.rate == pytest.approx(0.9 * climbed)
    for _ in range(5):   # the requests in flight when it came
        c.now += 0.05
        a.on_success(c.now - 1.0)
    assert a.bucket.rate == pytest.approx(0.9 * climbed)


def _measured(lim: Limiter, c: Clock) -> None:
    """A first cycle of the rate found from 429s has ended: the pool is paced by it."""
    d = Driver(c, lim.adaptive)
    d.ok(20, 0.1)
    d.refuse(ramp=20.0)
    d.ok(10, 0.1)
    assert lim.adaptive.bucket is not None
    lim.buckets["rpm"] = lim.adaptive.bucket


async def _refusals(lim: Limiter, c: Clock, n: int, guided: bool) -> list[int]:
    """``n`` refusals in a row; the pause step of each."""
    steps = []
    for _ in range(n):
        c.now += 0.1
        lim.finish(await lim.acquire(1, 1), "throttled", retry_after=1.0 if guided else None)
        steps.append(lim.pause_step(guided))
    return steps


def _pool(c: Clock) -> Limiter:
    lim = Limiter(Budgets(), 8, clock=c, sleep=c.sleep)
    lim.slots.slow_start, lim.slots.limit = False, 8.0
    return lim


async def test_the_first_pool_pause_after_cuts_of_a_measured_pace_is_the_schedules_first_step(
        ) -> None:
    # The first two refusals paused nothing (the pace was cut): the pause at the third is
    # the shortest one. A longer one would empty a sliding window, and the excess of the
    # climb back would stay hidden until it is larger, and costs a pause again.
    c = Clock()
    lim = _pool(c)
    _measured(lim, c)
    assert await _refusals(lim, c, 5, guided=False) == [1, 1, 1, 2, 3]


async def test_before_a_rate_is_measured_every_refusal_is_a_step_of_the_pause() -> None:
    # Start-up: the slow start's pace may be far above the limit (a burst went through).
    c = Clock()
    lim = _pool(c)
    lim.finish(await lim.acquire(1, 1), "ok", 1, 1)
    lim.buckets["rpm"] = lim.adaptive.provisional = \
        lim.adaptive.on_throttle(c.now, 1, ramp=100.0) or lim.adaptive.provisional
    assert await _refusals(lim, c, 3, guided=False) == [1, 2, 3]


async def test_guided_refusals_pause_from_the_first_so_each_is_a_step() -> None:
    c = Clock()
    lim = _pool(c)
    _measured(lim, c)
    assert await _refusals(lim, c, 3, guided=True) == [1, 2, 3]
