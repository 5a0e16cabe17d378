"""Specification of pipeline/ratelimit.py's meters: TokenBucket, Limiter (pacing, header
reading, usage reconciliation), AdaptiveRate and AdaptiveConcurrency.

A fake clock and a fake sleep are injected: sleeping advances the fake clock, so no test
waits on the wall clock and every schedule is exact. (PauseGate alone: test_ratelimit.py.)
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from pipeline.pacing.limiter import (
    AdaptiveConcurrency,
    AdaptiveRate,
    Budgets,
    Limiter,
    Permit,
    TokenBucket,
    read_limits,
)


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


def go(limit: float, remaining: float, reset: str, kind: str = "requests") -> dict[str, str]:
    """OpenAI-style rate-limit headers for one bucket."""
    return {f"x-ratelimit-limit-{kind}": str(limit),
            f"x-ratelimit-remaining-{kind}": str(remaining),
            f"x-ratelimit-reset-{kind}": reset}


# --------------------------------------------------------------------------- TokenBucket


def test_bucket_starts_full_with_a_one_second_burst() -> None:
    t = FakeTime()
    b = TokenBucket(5.0, t.clock)
    assert b.capacity == 5.0 and b.level == 5.0
    assert b.wait_time(5.0) == 0.0
    assert b.wait_time(5.5) == 0.0  # more than the burst: a full bucket is enough


def test_bucket_capacity_is_at_least_one_whole_request() -> None:
    t = FakeTime()
    b = TokenBucket(0.1, t.clock)  # 6 per minute
    assert b.capacity == 1.0
    assert b.wait_time(1.0) == 0.0
    b.take(1.0)
    assert b.wait_time(1.0) == pytest.approx(10.0)


def test_bucket_refills_continuously_not_at_the_top_of_a_window() -> None:
    t = FakeTime()
    b = TokenBucket(4.0, t.clock)
    b.take(4.0)
    assert b.wait_time(1.0) == pytest.approx(0.25)
    t.now += 0.125
    assert b.wait_time(1.0) == pytest.approx(0.125)
    t.now += 0.125
    assert b.wait_time(1.0) == 0.0
    b.take(0.0)
    assert b.level == pytest.approx(1.0)


def test_bucket_never_refills_above_its_burst() -> None:
    t = FakeTime()
    b = TokenBucket(2.0, t.clock)
    b.take(2.0)
    t.now += 100.0
    b.take(0.0)
    assert b.level == 2.0


def test_bucket_may_go_into_debt_and_must_repay_it() -> None:
    t = FakeTime()
    b = TokenBucket(10.0, t.clock)
    b.take(25.0)  # a cost above the burst is allowed from a full bucket...
    assert b.level == -15.0
    # ... and the next one waits until the debt and its own cost are refilled.
    assert b.wait_time(1.0) == pytest.approx(1.6)
    assert b.wait_time(25.0) == pytest.approx(2.5)  # needs only a full bucket again


def test_bucket_credit_refunds_up_to_the_burst_and_charges_into_debt() -> None:
    t = FakeTime()
    b = TokenBucket(100.0, t.clock)
    b.take(80.0)
    b.credit(30.0)
    assert b.level == 50.0
    b.credit(500.0)
    assert b.level == 100.0  # a refund never exceeds the burst
    b.credit(-130.0)
    assert b.level == -30.0  # an under-estimate charged afterwards: debt, no blocking


def test_bucket_cap_only_lowers_the_level() -> None:
    t = FakeTime()
    b = TokenBucket(10.0, t.clock)
    b.cap(3.0)
    assert b.level == 3.0
    b.cap(7.0)
    assert b.level == 3.0


def test_bucket_set_rate_counts_earlier_refill_at_the_old_rate() -> None:
    t = FakeTime()
    b = TokenBucket(10.0, t.clock)
    b.take(10.0)
    t.now += 0.5  # +5 at the old rate
    b.set_rate(2.0)
    assert b.capacity == 2.0
    assert b.level == 2.0  # clipped to the new, smaller burst
    b.take(2.0)
    t.now += 0.5
    b.take(0.0)
    assert b.level == pytest.approx(1.0)  # refilled at the new rate


# --------------------------------------------------------------------------- Limiter pacing


async def test_rpm_60_allows_one_request_then_one_per_second() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, rpm=60)
    sent = []
    for _ in range(5):
        p = await lim.acquire(100, 50)
        sent.append(p.sent_at)
        lim.finish(p, "ok", 100, 20)
    assert t.sleeps == [1.0, 1.0, 1.0, 1.0]
    assert sent == [0.0, 1.0, 2.0, 3.0, 4.0]


async def test_rpm_120_allows_a_burst_of_two_then_one_every_half_second() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, rpm=120)
    sent = []
    for _ in range(6):
        p = await lim.acquire(1, 1)
        sent.append(p.sent_at)
        lim.finish(p, "ok", 1, 1)
    assert t.sleeps == [0.5, 0.5, 0.5, 0.5]
    assert sent == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]


async def test_concurrent_acquirers_are_paced_one_after_another() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=8, rpm=60)

    async def one() -> float:
        p = await lim.acquire(1, 1)
        return p.sent_at

    sent = sorted(await asyncio.gather(*(one() for _ in range(4))))
    assert sent == [0.0, 1.0, 2.0, 3.0]  # no thundering herd through one refill


async def test_tpm_budget_paces_by_estimated_cost() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=6000)  # 100 tokens/s, burst 100
    sent = [(await lim.acquire(30, 20)).sent_at for _ in range(4)]  # 50 tokens each
    assert sent == [0.0, 0.0, 0.5, 1.0]


async def test_no_budget_never_waits() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t)
    for _ in range(100):
        lim.finish(await lim.acquire(1000, 1000), "ok", 1000, 10)
    assert t.sleeps == []


async def test_acquire_waits_out_a_pause_first() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t)
    lim.gate.pause(3.0)
    p = await lim.acquire(1, 1)
    assert p.sent_at == 3.0


# --------------------------------------------------------------------------- read_limits


def test_read_limits_openai_go_durations() -> None:
    headers = {
        "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert read_limits(headers) == {"rpm": (500.0, 499.0, pytest.approx(0.12)),
                                    "tpm": (30000.0, 0.0, 360.0)}


@pytest.mark.parametrize("reset, seconds", [("6m0s", 360.0), ("1.5s", 1.5), ("20ms", 0.02),
                                            ("1m30.5s", 90.5), ("1h2m3s", 3723.0)])
def test_read_limits_go_duration_forms(reset: str, seconds: float) -> None:
    limits = read_limits(go(100, 50, reset))
    assert limits["rpm"] == (100.0, 50.0, pytest.approx(seconds))


def test_read_limits_anthropic_rfc3339_resets() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()
    headers = {}
    for kind, limit, remaining, reset in [
        ("requests", "50", "49", "2024-05-01T12:00:01Z"),
        ("tokens", "100000", "60000", "2024-05-01T12:00:24Z"),
        ("input-tokens", "80000", "40000", "2024-05-01T12:00:30Z"),
        ("output-tokens", "20000", "19000", "2024-05-01T12:00:03Z"),
    ]:
        headers[f"anthropic-ratelimit-{kind}-limit"] = limit
        headers[f"anthropic-ratelimit-{kind}-remaining"] = remaining
        headers[f"anthropic-ratelimit-{kind}-reset"] = reset
    assert read_limits(headers, now=now) == {
        "rpm": (50.0, 49.0, 1.0), "tpm": (100000.0, 60000.0, 24.0),
        "itpm": (80000.0, 40000.0, 30.0), "otpm": (20000.0, 19000.0, 3.0)}


def test_read_limits_anthropic_reset_in_the_past_is_zero() -> None:
    now = datetime(2024, 5, 1, 12, 0, 10, tzinfo=timezone.utc).timestamp()
    headers = {"anthropic-ratelimit-requests-limit": "50",
               "anthropic-ratelimit-requests-remaining": "50",
               "anthropic-ratelimit-requests-reset": "2024-05-01T12:00:00Z"}
    assert read_limits(headers, now=now) == {"rpm": (50.0, 50.0, 0.0)}


def test_read_limits_litellm_prefixed_copies() -> None:
    headers = {"llm_provider-x-ratelimit-limit-requests": "60",
               "llm_provider-x-ratelimit-remaining-requests": "12",
               "llm_provider-x-ratelimit-reset-requests": "48s",
               "llm_provider-x-ratelimit-limit-tokens": "1000",
               "llm_provider-x-ratelimit-remaining-tokens": "900",
               "llm_provider-x-ratelimit-reset-tokens": "6s"}
    assert read_limits(headers) == {"rpm": (60.0, 12.0, 48.0), "tpm": (1000.0, 900.0, 6.0)}


@pytest.mark.parametrize("headers", [
    {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "12"},  # no reset
    {"x-ratelimit-limit-requests": "60", "x-ratelimit-reset-requests": "1s"},      # no remaining
    {"x-ratelimit-limit-requests": "lots", "x-ratelimit-remaining-requests": "1",
     "x-ratelimit-reset-requests": "1s"},
    {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "1",
     "x-ratelimit-reset-requests": "soon"},
    {"content-type": "text/event-stream"},
])
def test_read_limits_ignores_incomplete_or_unreadable_headers(headers: dict[str, str]) -> None:
    assert read_limits(headers) == {}


# --------------------------------------------------------------------------- Limiter.observe


async def test_observe_learns_rate_from_limit_minus_remaining_over_reset() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t)
    # 60 short of a 600 limit and full again in 30 s: the server refills 2 a second.
    lim.observe(go(600, 540, "30s"))
    bucket = lim.buckets["rpm"]
    assert bucket.learned
    assert bucket.rate == pytest.approx(2.0)


async def test_observe_caps_the_level_to_what_the_server_says_is_left() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t)
    lim.observe(go(600, 0, "60s"))  # 10/s, nothing left right now
    assert lim.buckets["rpm"].level == 0.0
    sent = [(await lim.acquire(1, 1)).sent_at for _ in range(3)]
    assert sent == [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)]


async def test_observe_smooths_later_observations() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t)
    lim.observe(go(100, 90, "10s"))   # 1/s
    lim.observe(go(100, 80, "5s"))    # 4/s
    assert lim.buckets["rpm"].rate == pytest.approx(0.7 * 1.0 + 0.3 * 4.0)


async def test_observe_learns_token_buckets_too() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t)
    lim.observe(go(30000, 27000, "6s", kind="tokens"))
    assert lim.buckets["tpm"].rate == pytest.approx(500.0)
    assert lim.buckets["tpm"].level == 500.0  # the burst, below the 27000 remaining


async def test_observe_never_overrides_a_user_budget_but_believes_remaining() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, rpm=600)  # 10/s
    lim.observe(go(6000, 3, "10s"))
    bucket = lim.buckets["rpm"]
    assert not bucket.learned
    assert bucket.rate == 10.0
    assert bucket.level == 3.0


@pytest.mark.parametrize("limit, remaining, reset", [(100, 100, "10s"), (100, 50, "0s")])
async def test_observe_learns_nothing_from_a_full_bucket_or_zero_reset(
        limit: int, remaining: int, reset: str) -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t)
    lim.observe(go(limit, remaining, reset))
    assert lim.buckets == {}


# --------------------------------------------------------------------------- reconciliation


async def test_ok_refunds_the_unused_max_tokens_reservation() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=60_000)  # 1000/s, burst 1000
    p = await lim.acquire(100, 500)
    assert (p.cost_in, p.cost_out) == (100, 500)
    assert lim.buckets["tpm"].level == 400.0
    lim.finish(p, "ok", 120, 15)  # used 135 of the 600 reserved
    assert lim.buckets["tpm"].level == 865.0


async def test_ok_charges_an_under_estimate() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=60_000)
    p = await lim.acquire(100, 500)
    lim.finish(p, "ok", 700, 50)  # 750 used, 600 reserved
    assert lim.buckets["tpm"].level == 250.0


async def test_reconciliation_per_input_and_output_bucket() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, itpm=60_000, otpm=60_000)  # 1000/s each
    p = await lim.acquire(300, 500)
    assert (lim.buckets["itpm"].level, lim.buckets["otpm"].level) == (700.0, 500.0)
    lim.finish(p, "ok", 350, 20)
    assert (lim.buckets["itpm"].level, lim.buckets["otpm"].level) == (650.0, 980.0)


@pytest.mark.parametrize("outcome", ["throttled", "overloaded"])
async def test_refused_request_refunds_every_token_cost(outcome: str) -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=600_000, itpm=600_000, otpm=600_000)  # 10 000/s each
    for b in lim.buckets.values():
        b.take(5000)
    p = await lim.acquire(300, 500)
    lim.finish(p, outcome)
    assert {n: b.level for n, b in lim.buckets.items()} == {
        "tpm": 5000.0, "itpm": 5000.0, "otpm": 5000.0}


async def test_error_without_usage_refunds_only_the_output_reservation() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=600_000, itpm=600_000, otpm=600_000)
    for b in lim.buckets.values():
        b.take(5000)
    p = await lim.acquire(300, 500)
    lim.finish(p, "error")
    assert {n: b.level for n, b in lim.buckets.items()} == {
        "tpm": 4700.0, "itpm": 4700.0, "otpm": 5000.0}


async def test_input_scale_converges_to_reported_over_estimated() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, tpm=6_000_000)
    for _ in range(100):
        p = await lim.acquire(1000, 100)
        lim.finish(p, "ok", 600, 10)  # the server counts 0.6 x the estimate
    assert lim.input_scale == pytest.approx(0.6, abs=1e-4)
    p = await lim.acquire(1000, 100)
    assert (p.cost_in, p.estimate_in) == (600, 1000)  # charged the learned scale
    # ... and reconciled against what was charged, not the raw estimate.
    before = lim.buckets["tpm"].level
    lim.finish(p, "ok", 600, 100)
    assert lim.buckets["tpm"].level == before


async def test_finish_releases_the_concurrency_slot() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=1)
    p = await lim.acquire(1, 1)
    assert lim.slots.in_flight == 1
    lim.finish(p, "error")
    assert lim.slots.in_flight == 0


# --------------------------------------------------------------------------- AdaptiveRate


def successes(rate: AdaptiveRate, t: FakeTime, n: int, every: float = 0.1) -> None:
    for _ in range(n):
        t.now += every
        rate.on_success()


def test_adaptive_429_without_evidence_creates_no_bucket() -> None:
    t = FakeTime(start=0.0)
    a = AdaptiveRate(t.clock)
    successes(a, t, 4)
    assert a.on_throttle(sent_at=t.now) is None
    assert a.bucket is None
    # ... and it does not count as a cut: a 429 once there is evidence is not ignored.
    successes(a, t, 6)
    assert a.on_throttle(sent_at=t.now - 0.01) is not None


def test_adaptive_old_successes_are_no_evidence() -> None:
    t = FakeTime(start=0.0)
    a = AdaptiveRate(t.clock)
    successes(a, t, 10)
    t.now += 5.0
    assert a.on_throttle(sent_at=t.now) is None


def test_adaptive_first_cut_is_half_the_accepted_rate() -> None:
    t = FakeTime(start=0.0)
    a = AdaptiveRate(t.clock)
    successes(a, t, 10)  # 10 within the last second
    bucket = a.on_throttle(sent_at=t.now)
    assert bucket is a.bucket and bucket is not None
    assert bucket.learned
    assert bucket.rate == pytest.approx(5.0)


def test_adaptive_ignores_429s_for_requests_sent_before_the_cut_settled() -> None:
    t = FakeTime(start=0.0)
    a = AdaptiveRate(t.clock)
    successes(a, t, 10)
    cut_at = t.now
    bucket = a.on_throttle(sent_at=cut_at)
    assert bucket is not None
    t.now += 0.3
    assert a.on_throttle(sent_at=cut_at - 0.2) is None           # sent before the cut
    assert a.on_throttle(sent_at=cut_at + a.settle / 2) is None  # before it settled
    assert bucket.rate == pytest.approx(5.0)
    assert a.on_throttle(sent_at=cut_at + a.settle + 0.01) is bucket  # paced at the new rate
    assert bucket.rate == pytest.approx(2.5)  # still refused within a span: halved


def test_adaptive_later_cut_is_gentle() -> None:
    t = FakeTime(start=0.0)
    a = AdaptiveRate(t.clock)
    successes(a, t, 10)
    bucket = a.on_throttle(sent_at=t.now)
    assert bucket is not None and bucket.rate == pytest.approx(5.0)
    t.now += 2.0  # more than a span after the last cut: probing just above the limit
    assert a.on_throttle(sent_at=t.now) is bucket
    assert bucket.rate == pytest.approx(0.8 * 5.0)


def test_adaptive_cut_never_leaves_the_rate_above_what_the_server_accepted() -> None:
    t = FakeTime(start=0.0)
    a = AdaptiveRate(t.clock)
    successes(a, t, 10)
    bucket = a.on_throttle(sent_at=t.now)
    assert bucket is not None
    t.now += 2.0
    successes(a, t, 5)  # 5 accepted in the last second; the rate grew to ~6.3
    assert bucket.rate > 6.0
    assert a.on_throttle(sent_at=t.now) is bucket
    assert bucket.rate == pytest.approx(0.95 * 5)  # not 0.8 x 6.3 = 5.04


def test_adaptive_rate_has_a_floor() -> None:
    t = FakeTime(start=0.0)
    a = AdaptiveRate(t.clock)
    successes(a, t, 10)
    bucket = a.on_throttle(sent_at=t.now)
    assert bucket is not None
    for _ in range(30):
        t.now += 2.0
        a.on_throttle(sent_at=t.now)
    assert bucket.rate == pytest.approx(0.05)


def test_adaptive_successes_raise_the_rate_multiplicatively() -> None:
    t = FakeTime(start=0.0)
    a = AdaptiveRate(t.clock)  # gain 0.1: +10% per second without a 429
    successes(a, t, 10)
    bucket = a.on_throttle(sent_at=t.now)
    assert bucket is not None and bucket.rate == pytest.approx(5.0)
    t.now += 1.0
    a.on_success()
    assert bucket.rate == pytest.approx(5.5)
    t.now += 1.0
    a.on_success()
    assert bucket.rate == pytest.approx(6.05)  # compounds
    t.now += 0.5
    a.on_success()
    assert bucket.rate == pytest.approx(6.05 * 1.05)


async def test_limiter_installs_the_adaptive_rate_only_without_an_rpm_budget() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t)
    for _ in range(10):
        t.now += 0.1
        lim.finish(await lim.acquire(1, 1), "ok", 1, 1)
    p = await lim.acquire(1, 1)
    lim.finish(p, "throttled")
    assert lim.buckets["rpm"] is lim.adaptive.bucket
    assert lim.buckets["rpm"].rate == pytest.approx(5.0)
    assert lim.throttled == 1

    budgeted = limiter(t, rpm=600)
    user_bucket = budgeted.buckets["rpm"]
    for _ in range(10):
        t.now += 0.1
        budgeted.finish(await budgeted.acquire(1, 1), "ok", 1, 1)
    budgeted.finish(await budgeted.acquire(1, 1), "throttled")
    assert budgeted.buckets["rpm"] is user_bucket
    assert user_bucket.rate == 10.0


async def test_overload_halves_concurrency_not_the_rate() -> None:
    t = FakeTime(start=0.0)
    lim = limiter(t, concurrency=16)
    for _ in range(10):
        t.now += 0.1
        lim.finish(await lim.acquire(1, 1), "ok", 1, 1)
    lim.finish(await lim.acquire(1, 1), "overloaded")
    assert lim.slots.limit == 8.0
    assert "rpm" not in lim.buckets


# --------------------------------------------------------------------------- AdaptiveConcurrency


def test_concurrency_halves_once_per_cooldown() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(16, t.clock, cooldown=1.0)
    c.on_throttle()
    assert c.limit == 8.0
    t.now += 0.5
    c.on_throttle()  # the same burst of 429s
    assert c.limit == 8.0
    t.now += 0.5
    c.on_throttle()
    assert c.limit == 4.0
    for _ in range(10):
        t.now += 1.0
        c.on_throttle()
    assert c.limit == 1.0  # never below one


def test_concurrency_grows_by_one_over_limit_per_success_up_to_the_maximum() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(4, t.clock)
    c.on_throttle()
    assert c.limit == 2.0
    c.on_success()
    assert c.limit == pytest.approx(2.5)
    c.on_success()
    assert c.limit == pytest.approx(2.9)
    for _ in range(100):
        c.on_success()
    assert c.limit == 4.0


async def test_concurrency_acquire_blocks_at_the_limit() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(3, t.clock)
    for _ in range(3):
        await c.acquire()
    waiter = asyncio.create_task(c.acquire())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    c.release()
    await asyncio.wait_for(waiter, 1)
    assert c.in_flight == 3


async def test_concurrency_cut_blocks_until_in_flight_drops_below_it() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(4, t.clock)
    for _ in range(4):
        await c.acquire()
    c.on_throttle()  # limit 2 with 4 in flight
    waiter = asyncio.create_task(c.acquire())
    c.release()
    c.release()  # 2 in flight: still at the limit
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    c.release()
    await asyncio.wait_for(waiter, 1)
    assert c.in_flight == 2


async def test_concurrency_growth_admits_a_waiter() -> None:
    t = FakeTime(start=0.0)
    c = AdaptiveConcurrency(2, t.clock)
    c.on_throttle()  # limit 1
    await c.acquire()
    waiter = asyncio.create_task(c.acquire())
    await asyncio.sleep(0)
    c.on_success()  # limit 2: room for one more, no release needed
    await asyncio.wait_for(waiter, 1)
    assert c.in_flight == 2


async def test_concurrency_cancelled_waiter_passes_its_wakeup_on() -> None:
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


def test_permit_defaults() -> None:
    p = Permit(10, 20, 12)
    assert p.sent_at == 0.0
