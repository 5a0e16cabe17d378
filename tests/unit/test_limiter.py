"""Specification of the limiter's pacing: TokenBucket, budgets, slow start, the window in
flight, reconciliation of token costs (pipeline/ratelimit.py, pipeline/meters.py).

A fake clock and a fake sleep are injected: sleeping advances the fake clock, so no test
waits on the wall clock and every schedule is exact. Header ceilings and their pace:
test_header_limits.py; the rate found from bare 429s: test_adaptive_rate.py; PauseGate:
test_ratelimit.py.
"""

from __future__ import annotations

import asyncio

import pytest

from pipeline.pacing.limiter import AdaptiveConcurrency, Budgets, Limiter, Permit, TokenBucket
from pipeline.pacing.meters import PACE_SHARE


class FakeTime:
    """``now`` moves only when someone sleeps (or a test advances it)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        called_at = self.now
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would
        self.now = max(self.now, called_at + seconds)


def limiter(t: FakeTime, concurrency: int = 64, **budgets: float) -> Limiter:
    return Limiter(Budgets(**budgets), concurrency, clock=t.clock, sleep=t.sleep)


def most_in_any_window(times: list[float], window: float) -> int:
    return max(sum(1 for u in times if s <= u < s + window) for s in times)


# --------------------------------------------------------------------------- TokenBucket


def test_pacer_holds_one_request_and_fifty_milliseconds_of_credit() -> None:
    t = FakeTime()
    b = TokenBucket(10.0, t.clock)
    assert b.capacity == pytest.approx(1.5) and b.level == pytest.approx(1.5)
    assert b.wait_time(1.0) == 0.0


def test_pacer_refills_continuously_not_at_the_top_of_a_window() -> None:
    t = FakeTime()
    b = TokenBucket(4.0, t.clock)
    b.take(b.capacity)
    assert b.wait_time(1.0) == pytest.approx(0.25)
    t.now += 0.125
    assert b.wait_time(1.0) == pytest.approx(0.125)
    t.now += 0.125
    assert b.wait_time(1.0) == 0.0


def test_pacer_never_refills_above_its_capacity() -> None:
    t = FakeTime()
    b = TokenBucket(2.0, t.clock)
    b.take(1.0)
    t.now += 100.0
    b.take(0.0)
    assert b.level == pytest.approx(b.capacity)


def test_pacer_may_go_into_debt_and_must_repay_it() -> None:
    t = FakeTime()
    b = TokenBucket(10.0, t.clock)  # capacity 1.5
    b.take(25.0)  # a cost above the capacity is allowed from a full pacer...
    assert b.level == pytest.approx(-23.5)
    # ... and the next one waits until the debt and its own cost are refilled.
    assert b.wait_time(1.0) == pytest.approx(2.45)
    assert b.wait_time(25.0) == pytest.approx(2.5)  # needs only a full pacer again


def test_pacer_credit_refunds_up_to_the_capacity_and_charges_into_debt() -> None:
    t = FakeTime()
    b = TokenBucket(100.0, t.clock)  # capacity 6
    b.take(80.0)
    b.credit(30.0)
    assert b.level == pytest.approx(-44.0)
    b.credit(500.0)
    assert b.level == pytest.approx(6.0)  # a refund never exceeds the capacity
    b.credit(-30.0)
    assert b.level == pytest.approx(-24.0)  # an under-estimate charged afterwards


def test_pacer_drain_empties_it_without_forgiving_debt() -> None:
    t = FakeTime()
    b = TokenBucket(10.0, t.clock)
    b.drain()
    assert b.level == 0.0
    b.take(3.0)
    b.drain()
    assert b.level == -3.0


def test_pacer_set_rate_counts_earlier_refill_at_the_old_rate() -> None:
    t = FakeTime()
    b = TokenBucket(10.0, t.clock)
    b.take(b.capacity)
    t.now += 0.05  # +0.5 at the old rate
    b.set_rate(2.0)
    assert b.capacity == pytest.approx(1.1)
    assert b.level == pytest.approx(0.5)
    t.now += 0.25
    b.take(0.0)
    assert b.level == pytest.approx(1.0)  # refilled at the new rate


# --------------------------------------------------------------------------- budgets


async def test_a_budget_is_paced_just_under_it_and_spread_evenly() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, rpm=60)
    sent = []
    for _ in range(12):
        p = await lim.acquire(100, 50)
        sent.append(p.sent_at)
        lim.finish(p, "ok", 100, 20)
    gaps = [b - a for a, b in zip(sent[2:], sent[3:], strict=False)]
    assert gaps == pytest.approx([1 / PACE_SHARE] * len(gaps))


async def test_a_budget_never_bursts_so_no_window_sees_more_than_its_share() -> None:
    # 600 a minute is 60 in any 6 s, also to a sliding or a clock-aligned window.
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=64, rpm=600)

    async def one() -> float:
        p = await lim.acquire(1, 1)
        lim.finish(p, "ok", 1, 1)
        return p.sent_at

    sent = sorted(await asyncio.gather(*(one() for _ in range(200))))
    credit = lim.buckets["rpm"].capacity  # one request and 50 ms worth
    for window in (1.0, 6.0, 15.0):
        assert most_in_any_window(sent, window) <= credit + 10 * PACE_SHARE * window
    assert most_in_any_window(sent, 6.0) <= 60


async def test_concurrent_acquirers_are_paced_one_after_another() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=8, rpm=60)

    async def one() -> float:
        p = await lim.acquire(1, 1)
        return p.sent_at

    sent = sorted(await asyncio.gather(*(one() for _ in range(4))))
    assert sent[0] == 0.0
    assert [b - a for a, b in zip(sent[1:], sent[2:], strict=False)] == pytest.approx(
        [1 / PACE_SHARE] * 2)  # no thundering herd through one refill


async def test_a_token_budget_paces_by_estimated_cost() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=6000)  # 98 tokens/s paced
    sent = [(await lim.acquire(30, 20)).sent_at for _ in range(4)]  # 50 tokens each
    assert [b - a for a, b in zip(sent[1:], sent[2:], strict=False)] == pytest.approx(
        [50 / 98] * 2)


async def test_a_user_budget_skips_slow_start() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=8, rpm=600_000)
    permits = [await asyncio.wait_for(lim.acquire(1, 1), 1) for _ in range(8)]
    assert lim.slots.in_flight == 8 and len(permits) == 8


async def test_acquire_waits_out_a_pause_first() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, rpm=600_000)
    lim.gate.pause(3.0)
    p = await lim.acquire(1, 1)
    assert p.sent_at == 3.0


async def test_cancel_gives_a_granted_permit_back() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=2, rpm=60, tpm=60_000)
    before = {n: b.level for n, b in lim.buckets.items()}
    p = await lim.acquire(100, 50)
    lim.cancel(p)
    assert lim.slots.in_flight == 0
    assert {n: b.level for n, b in lim.buckets.items()} == pytest.approx(before)


# --------------------------------------------------------------------------- slow start


async def test_slow_start_lets_one_request_out_first() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=8)
    first = await lim.acquire(1, 1)
    second = asyncio.ensure_future(lim.acquire(1, 1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not second.done()
    t.now += 0.5
    lim.finish(first, "ok", 1, 1)
    await asyncio.wait_for(second, 1)
    assert lim.slots.limit == 2


async def test_slow_start_doubles_the_window_every_round_trip() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=12)
    windows = []
    for _ in range(5):
        round_trip = []
        while lim.slots.in_flight < int(lim.slots.limit):
            round_trip.append(await lim.acquire(1, 1))
        windows.append(len(round_trip))
        t.now += 0.4
        for p in round_trip:
            lim.finish(p, "ok", 1, 1)
    assert windows == [1, 2, 4, 8, 12]  # then the cap of --concurrency


async def test_slow_start_spreads_each_round_trips_sends_over_the_round_trip() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=64)
    for _ in range(2):  # window 1, then 2: the round trip is learned (0.4 s)
        round_trip = [await lim.acquire(1, 1) for _ in range(int(lim.slots.limit))]
        t.now += 0.4
        for p in round_trip:
            lim.finish(p, "ok", 1, 1)
    assert lim.slots.limit == 4
    sent = [(await lim.acquire(1, 1)).sent_at for _ in range(4)]
    assert sent[-1] - sent[0] >= 0.25  # over the round trip of 0.4 s, not four at once


async def test_slow_start_ends_at_a_429_one_below_what_was_in_flight() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=64)
    lim.slots.limit = 9.0  # as slow start left it
    permits = [await lim.acquire(1, 1) for _ in range(9)]
    lim.finish(permits[-1], "throttled")  # the ninth in flight was refused
    assert not lim.slots.slow_start
    assert lim.slots.limit == 8.0


# --------------------------------------------------------------------------- window


def test_a_refusal_with_the_window_full_cuts_it_to_one_below() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(16, t.clock)
    c.slow_start, c.limit = False, 6.0
    c.on_refused(in_flight=3)  # the window was not full: a rate, not a cap
    assert c.limit == 6.0
    c.on_refused(in_flight=6)
    assert c.limit == 5.0 and c.capped


def test_after_finding_a_cap_the_window_probes_for_more_ever_more_rarely() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(16, t.clock)
    c.slow_start, c.limit = False, 5.0
    c.on_refused(in_flight=5)  # capped at 4
    successes = 0
    while c.limit < 5.0:
        c.on_success()
        successes += 1
    assert 4 * 64 <= successes <= 5 * 64  # ~64 round trips of 4 or 5 for one more
    c.on_refused(in_flight=5)  # found the cap again
    successes = 0
    while c.limit < 5.0:
        c.on_success()
        successes += 1
    assert 4 * 128 <= successes <= 5 * 128  # half as often


def test_overload_halves_the_window_once_per_cooldown() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(16, t.clock, cooldown=1.0, initial=16)
    c.on_throttle()
    assert c.limit == 8.0
    t.now += 0.5
    c.on_throttle()  # the same burst of 529s
    assert c.limit == 8.0
    t.now += 0.5
    c.on_throttle()
    assert c.limit == 4.0
    for _ in range(10):
        t.now += 1.0
        c.on_throttle()
    assert c.limit == 1.0  # never below one


def test_window_grows_by_one_over_limit_per_success_up_to_the_maximum() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(4, t.clock, initial=4)
    c.on_throttle()
    assert c.limit == 2.0
    c.on_success()
    assert c.limit == pytest.approx(2.5)
    for _ in range(100):
        c.on_success()
    assert c.limit == 4.0


async def test_after_a_pause_with_nothing_pacing_the_pool_starts_again_from_one() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=8)
    lim.slots.slow_start, lim.slots.limit = False, 8.0
    lim.pause(2.0)
    assert lim.slots.limit == 1.0 and lim.slots.slow_start
    for _ in range(7):
        lim.slots.on_success()
    assert lim.slots.limit == 8.0 and not lim.slots.slow_start  # back where it was


async def test_window_acquire_blocks_at_the_limit_and_release_admits() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(3, t.clock, initial=3)
    for _ in range(3):
        await c.acquire()
    waiter = asyncio.create_task(c.acquire())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    c.release()
    await asyncio.wait_for(waiter, 1)
    assert c.in_flight == 3


async def test_window_cancelled_waiter_passes_its_wakeup_on() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(1, t.clock)
    await c.acquire()
    first = asyncio.create_task(c.acquire())
    second = asyncio.create_task(c.acquire())
    await asyncio.sleep(0)
    c.release()    # wakes `first` ...
    first.cancel()  # ... which is cancelled before it takes the slot
    await asyncio.gather(first, return_exceptions=True)
    for _ in range(5):
        await asyncio.sleep(0)
    try:
        assert second.done(), "a slot is free but the remaining waiter is still blocked"
        assert c.in_flight == 1
    finally:
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)


async def test_only_the_pacers_holder_takes_a_place_while_it_waits() -> None:
    # A window cut while many wait must hold them: they are not in flight yet.
    t = FakeTime(start=0.0)

    async def never(seconds: float) -> None:  # the pacer's wait does not end here
        await asyncio.Event().wait()

    lim = Limiter(Budgets(rpm=6), 8, clock=t.clock, sleep=never)
    waiters = [asyncio.ensure_future(lim.acquire(1, 1)) for _ in range(5)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert lim.slots.in_flight == 2  # the one sent and the one waiting for the pace
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert lim.slots.in_flight == sum(1 for w in waiters if not w.cancelled())


# --------------------------------------------------------------------------- reconciliation


async def test_ok_refunds_the_unused_max_tokens_reservation() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=60_000)  # paced 980/s, capacity 50
    p = await lim.acquire(100, 500)
    assert (p.cost_in, p.cost_out) == (100, 500)
    assert lim.buckets["tpm"].level == pytest.approx(50 - 600)
    lim.finish(p, "ok", 120, 15)  # used 135 of the 600 reserved
    assert lim.buckets["tpm"].level == pytest.approx(50 - 135)


async def test_ok_charges_an_under_estimate() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=60_000)
    p = await lim.acquire(100, 500)
    lim.finish(p, "ok", 700, 50)  # 750 used, 600 reserved
    assert lim.buckets["tpm"].level == pytest.approx(50 - 750)


async def test_reconciliation_per_input_and_output_bucket() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, itpm=60_000, otpm=60_000)
    p = await lim.acquire(300, 500)
    lim.finish(p, "ok", 350, 20)
    assert lim.buckets["itpm"].level == pytest.approx(50 - 350)
    assert lim.buckets["otpm"].level == pytest.approx(50 - 20)


@pytest.mark.parametrize("outcome", ["throttled", "overloaded"])
async def test_refused_request_refunds_every_token_cost(outcome: str) -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=600_000, itpm=600_000, otpm=600_000)  # capacity 491 each
    p = await lim.acquire(300, 200)
    assert [b.level for b in lim.buckets.values()] == pytest.approx([-9, 191, 291])
    lim.finish(p, outcome)
    assert [b.level for b in lim.buckets.values()] == pytest.approx([491] * 3)


async def test_error_without_usage_refunds_only_the_output_reservation() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=600_000, itpm=600_000, otpm=600_000)
    p = await lim.acquire(300, 200)
    lim.finish(p, "error")  # the input was spent, the output never came
    assert [b.level for b in lim.buckets.values()] == pytest.approx([191, 191, 491])


async def test_the_first_usage_report_sets_the_input_scale_later_ones_average() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=6_000_000)
    p = await lim.acquire(1000, 100)
    lim.finish(p, "ok", 600, 10)  # the server counts 0.6 x the estimate
    assert lim.input_scale == pytest.approx(0.6)
    p = await lim.acquire(1000, 100)
    assert (p.cost_in, p.estimate_in) == (600, 1000)  # charged the learned scale
    lim.finish(p, "ok", 800, 10)
    assert lim.input_scale == pytest.approx(0.9 * 0.6 + 0.1 * 0.8)


async def test_a_permit_is_charged_the_scale_learned_while_it_waited() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=4, tpm=6000)  # 98 tokens/s
    first = await lim.acquire(1000, 0)
    waiting = asyncio.ensure_future(lim.acquire(1000, 0))
    await asyncio.sleep(0)
    lim.finish(first, "ok", 100, 0)  # the estimate was 10x too high
    p = await asyncio.wait_for(waiting, 1)
    assert p.cost_in == 100


async def test_finish_releases_the_place_in_flight() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=1)
    p = await lim.acquire(1, 1)
    assert lim.slots.in_flight == 1
    lim.finish(p, "error")
    assert lim.slots.in_flight == 0


def test_permit_defaults() -> None:
    p = Permit(10, 20, 12)
    assert p.sent_at == 0.0 and p.in_flight == 0 and p.marks == {}


def test_a_cap_found_by_refusals_that_ask_to_wait_is_probed_four_times_as_rarely() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(16, t.clock)
    c.slow_start, c.limit = False, 5.0
    c.on_refused(in_flight=5, costly=True)  # a 429 with Retry-After: each probe, a pause
    successes = 0
    while c.limit < 5.0:
        c.on_success()
        successes += 1
    assert 4 * 256 <= successes <= 5 * 256
