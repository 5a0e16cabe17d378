"""The simulator's limiter kinds (pipeline/sim_limits.py) on a fake clock: what each admits,
what it refuses and for how long, and that what it reports is what it enforces.

``remaining`` is what may still be admitted now; ``reset_seconds`` the time until it
is fully replenished if nothing more comes (as OpenAI and Anthropic document reset).
"""

from __future__ import annotations

import pytest

from pipeline.simulator.app import SimConfig
from pipeline.simulator.limits import (
    FixedWindow,
    RateLimits,
    Refusal,
    SlidingLog,
    Ticket,
    TokenBucket,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- token bucket


def test_bucket_admits_a_burst_of_its_limit_then_its_rate() -> None:
    c = Clock()
    b = TokenBucket(6, 6.0, c)  # 1 a second
    for _ in range(6):
        assert b.wait_for(1) == 0.0
        b.take(1)
    assert b.wait_for(1) == pytest.approx(1.0)
    assert b.reset_seconds() == pytest.approx(6.0)
    c.now += 1.0
    assert b.wait_for(1) == 0.0 and b.remaining() == pytest.approx(1.0)


# ---------------------------------------------------------------- sliding log


def test_sliding_log_admits_at_most_its_limit_in_any_window() -> None:
    c = Clock()
    log = SlidingLog(3, 10.0, c)
    for at in (0.0, 4.0, 8.0):
        c.now = 1000.0 + at
        assert log.wait_for(1) == 0.0
        log.take(1)
    c.now = 1009.0
    assert log.remaining() == 0
    assert log.wait_for(1) == pytest.approx(1.0)  # until the first one ages out at 10 s
    c.now = 1010.0
    assert log.wait_for(1) == 0.0 and log.remaining() == 1


def test_sliding_log_frees_room_only_as_entries_age_out_not_all_at_once() -> None:
    c = Clock()
    log = SlidingLog(4, 10.0, c)
    for _ in range(4):
        log.take(1)  # a burst at 1000 s
    c.now = 1009.9
    assert log.remaining() == 0  # a bucket would have refilled most of it by now
    c.now = 1010.0
    assert log.remaining() == 4


def test_sliding_log_resets_when_its_newest_entry_ages_out() -> None:
    c = Clock()
    log = SlidingLog(5, 10.0, c)
    log.take(1)
    c.now += 3.0
    log.take(1)
    assert log.reset_seconds() == pytest.approx(10.0)
    c.now += 4.0
    assert log.reset_seconds() == pytest.approx(6.0)
    c.now += 6.0
    assert log.reset_seconds() == 0.0 and log.remaining() == 5


def test_sliding_log_gives_back_unused_tokens_of_an_entry_still_in_the_window() -> None:
    c = Clock()
    log = SlidingLog(1000, 10.0, c)
    entry = log.take(600)
    log.give_back(entry, 400)
    assert log.remaining() == 800
    old = log.take(100)
    c.now += 11.0  # it aged out: nothing to give back any more
    log.give_back(old, 50)
    assert log.remaining() == 1000


def test_sliding_log_waits_until_enough_tokens_age_out() -> None:
    c = Clock()
    log = SlidingLog(1000, 10.0, c)
    log.take(500)
    c.now += 2.0
    log.take(400)
    assert log.wait_for(200) == pytest.approx(8.0)  # the 500 must go
    assert log.wait_for(1000) == pytest.approx(10.0)  # both must go


# ---------------------------------------------------------------- fixed window


def test_fixed_window_admits_its_limit_per_clock_window_and_turns_all_at_once() -> None:
    c = Clock(60.0 * 100 + 50.0)  # 50 s into a minute
    w = FixedWindow(2, 60.0, c)
    w.take(1)
    w.take(1)
    assert w.wait_for(1) == pytest.approx(10.0)  # until the next minute begins
    assert w.reset_seconds() == pytest.approx(10.0)
    c.now += 10.0
    assert w.wait_for(1) == 0.0 and w.remaining() == 2


def test_fixed_window_forgets_a_give_back_from_a_window_that_turned() -> None:
    c = Clock(0.0)
    w = FixedWindow(100, 10.0, c)
    earlier = w.take(50)
    c.now = 10.0
    w.take(30)
    w.give_back(earlier, 40)
    assert w.remaining() == 70


def test_an_untouched_fixed_window_reports_no_reset() -> None:
    w = FixedWindow(5, 10.0, Clock(3.0))
    assert w.reset_seconds() == 0.0 and w.remaining() == 5


# ---------------------------------------------------------------- RateLimits


def limits(**config: object) -> tuple[RateLimits, Clock]:
    c = Clock(0.0)
    return RateLimits(SimConfig(**config), clock=c), c  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["bucket", "sliding", "fixed"])
def test_every_rate_kind_takes_from_both_meters_or_neither(kind: str) -> None:
    lim, _ = limits(limiter=kind, rpm=10, tpm=1000, window=60.0)
    ticket = lim.admit(600)
    assert isinstance(ticket, Ticket)
    refusal = lim.admit(600)  # the tokens do not fit: no request is counted either
    assert isinstance(refusal, Refusal) and refusal.kind == "tokens"
    assert lim.buckets["requests"].remaining() == 9


def test_a_request_larger_than_the_whole_token_limit_is_refused_for_good() -> None:
    lim, _ = limits(limiter="sliding", tpm=1000, window=60.0)
    refusal = lim.admit(1001)
    assert isinstance(refusal, Refusal) and refusal.retry_after is None


def test_the_concurrency_limiter_caps_what_is_in_flight_and_reports_no_rate() -> None:
    lim, _ = limits(limiter="concurrency", max_in_flight=2)
    first, second = lim.admit(100), lim.admit(100)
    refusal = lim.admit(100)
    assert isinstance(refusal, Refusal) and refusal.kind == "concurrency"
    assert lim.buckets == {}  # nothing to report in x-ratelimit-* headers
    assert isinstance(first, Ticket)
    lim.release(first, 0)
    assert isinstance(lim.admit(100), Ticket)
    assert isinstance(second, Ticket)


def test_release_is_idempotent_for_the_cap_in_flight() -> None:
    lim, _ = limits(limiter="concurrency", max_in_flight=1)
    ticket = lim.admit(1)
    assert isinstance(ticket, Ticket)
    lim.release(ticket, 0)
    lim.release(ticket, 0)
    assert lim.in_flight == 0


@pytest.mark.parametrize("config", [
    {"limiter": "concurrency"},                                   # no cap
    {"limiter": "concurrency", "max_in_flight": 2, "rpm": 10},    # a rate on a cap
    {"limiter": "sliding", "max_in_flight": 2},                   # a cap on a rate kind
    {"limiter": "leaky"},
    {"storm": -1.0},
    {"retry_after": " "},
])
def test_inconsistent_limiter_settings_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**config)  # type: ignore[arg-type]
