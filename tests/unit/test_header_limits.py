"""Specification of pipeline/headerlimits.py and of how the limiter uses it: rate-limit
headers as hard ceilings until their reset (counting requests in flight), window resets,
capped resets, the pace they imply, and the status hook that names a long wait.

A fake clock is injected (and, for the limiter, a fake sleep): no wall clock anywhere.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import pytest

from pipeline.pacing.headerlimits import PACE_HORIZON, HeaderCeiling, read_limits
from pipeline.pacing.limiter import Budgets, Limiter
from pipeline.pacing.meters import PACE_SHARE


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        called_at = self.now
        await asyncio.sleep(0)
        self.now = max(self.now, called_at + seconds)


async def never(seconds: float) -> None:
    """A sleep that does not end: the test looks at the limiter while it waits."""
    await asyncio.Event().wait()


def go(limit: float, remaining: float, reset: str, kind: str = "requests") -> dict[str, str]:
    """OpenAI-style rate-limit headers for one bucket."""
    return {f"x-ratelimit-limit-{kind}": str(limit),
            f"x-ratelimit-remaining-{kind}": str(remaining),
            f"x-ratelimit-reset-{kind}": reset}


def ceiling(c: Clock, max_wait: float = 600.0) -> HeaderCeiling:
    return HeaderCeiling(c, max_wait)


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
                                            ("1m30.5s", 90.5), ("1h2m3s", 3723.0),
                                            ("86400s", 86400.0)])
def test_read_limits_go_duration_forms(reset: str, seconds: float) -> None:
    limits = read_limits(go(100, 50, reset))
    assert limits["rpm"] == (100.0, 50.0, pytest.approx(seconds))


def test_read_limits_anthropic_rfc3339_resets() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()
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
    now = datetime(2024, 5, 1, 12, 0, 10, tzinfo=UTC).timestamp()
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


def test_read_limits_clamps_remaining_above_the_limit() -> None:
    assert read_limits(go(60, 75, "1s")) == {"rpm": (60.0, 60.0, 1.0)}


@pytest.mark.parametrize("headers", [
    {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "12"},  # no reset
    {"x-ratelimit-limit-requests": "60", "x-ratelimit-reset-requests": "1s"},      # no remaining
    go("lots", 1, "1s"), go(60, 1, "soon"), go(60, -1, "1s"), go(0, 0, "1s"),
    go("inf", 1, "1s"), go(60, "nan", "1s"), go(60, 1, "inf"),
    {"content-type": "text/event-stream"},
])
def test_read_limits_ignores_incomplete_or_unusable_headers(headers: dict[str, str]) -> None:
    assert read_limits(headers) == {}


# --------------------------------------------------------------------------- ceilings


def test_remaining_is_a_ceiling_counting_what_was_sent_after_the_request() -> None:
    c = Clock()
    h = ceiling(c)
    first = h.charge(1)
    h.charge(1)
    h.charge(1)  # two more on the way when the first one's answer arrives
    h.observe(10, 5, 60.0, first, sent_at=c.now)
    assert h.available() == 3.0


def test_a_reading_showing_less_room_than_the_best_one_does_not_replace_it() -> None:
    c = Clock()
    h = ceiling(c)
    first, second = h.charge(1), h.charge(1)
    h.observe(10, 5, 60.0, second, sent_at=c.now)  # counted both
    h.observe(10, 5, 60.0, first, sent_at=c.now)   # older: counted the first only
    assert h.available() == 5.0


def test_a_429s_reading_replaces_whatever_was_believed() -> None:
    c = Clock()
    h = ceiling(c)
    mark = h.charge(1)
    h.observe(10, 8, 60.0, mark, sent_at=c.now)
    refused = h.charge(1)
    h.observe(10, 0, 60.0, refused, sent_at=c.now, refused=True)  # another user, say
    assert h.available() == 0.0


def test_the_ceiling_lifts_at_the_reset_less_what_was_sent_since_the_reading() -> None:
    c = Clock()
    h = ceiling(c)
    h.growth = 0.0  # a fixed window: no room in between
    mark = h.charge(1)
    h.observe(10, 0, 6.0, mark, sent_at=c.now)
    assert h.wait(1) == pytest.approx(6.0)
    h.charge(1)
    h.charge(1)  # two sent later anyway (say, after a capped wait): they still count
    c.now += 6.0
    assert h.available() == 8.0


def test_a_reset_longer_than_max_retry_wait_is_capped_then_one_request_goes_to_see() -> None:
    c = Clock()
    h = ceiling(c, max_wait=60.0)
    mark = h.charge(1)
    h.observe(1000, 0, 86400.0, mark, sent_at=c.now)  # a daily quota, used up
    assert h.wait(1) == pytest.approx(60.0)
    c.now += 60.0
    assert h.available() == math.inf  # one may go ...
    probe = h.charge(1)
    assert h.available() == 0.0 and h.wait(1) == pytest.approx(60.0)  # ... and only one
    h.observe(1000, 999, 86400.0, probe, sent_at=c.now)  # the quota is back
    assert h.available() == 999.0


def test_a_window_longer_than_the_pace_horizon_is_capped_never_paced() -> None:
    c = Clock()
    h = ceiling(c)
    h.observe(14400, 14000, 86400.0, h.charge(1), sent_at=c.now)
    assert h.pace() is None
    assert h.available() == 14000.0  # the quota is there to be used at full speed
    assert PACE_HORIZON < 86400.0


def test_the_pace_is_the_limit_per_the_longest_reset_seen() -> None:
    c = Clock()
    h = ceiling(c)
    h.observe(60, 59, 0.1, h.charge(1), sent_at=c.now)  # a full bucket: a short reset
    assert h.pace() == pytest.approx(600.0)
    h.observe(60, 0, 6.0, h.charge(1), sent_at=c.now)   # empty: the window's length
    assert h.pace() == pytest.approx(10.0)
    h.observe(60, 30, 3.0, h.charge(1), sent_at=c.now)
    assert h.pace() == pytest.approx(10.0)


def test_room_grows_at_the_pace_from_when_the_observed_request_was_sent() -> None:
    # A bucket or a sliding window frees room while the answer is on its way.
    c = Clock()
    h = ceiling(c)
    sent_at = c.now
    mark = h.charge(1)
    c.now += 0.2  # the answer's head comes after the time to first token
    h.observe(60, 0, 6.0, mark, sent_at=sent_at)
    assert h.available() == pytest.approx(2.0)  # 10 a second for 0.2 s
    c.now += 100.0
    assert h.available() == 60.0  # never more than the whole limit


def test_readings_that_show_no_growth_stop_the_refill_credit() -> None:
    # A fixed window frees nothing until it turns: its readings say so.
    c = Clock()
    h = ceiling(c)
    h.observe(60, 60, 6.0, 0.0, sent_at=c.now)
    for _ in range(20):
        c.now += 0.5
        h.observe(60, 60 - h.sent - 1, 6.0, h.charge(1), sent_at=c.now)
    assert not h.refills
    assert h.available() == h.reading.base - h.sent  # type: ignore[union-attr]


def test_a_sliding_window_after_a_slow_start_still_shows_growth() -> None:
    # A sliding log frees exactly what was sent one window earlier: after a slow first
    # window (1 a second) its readings grow slowly, like a fixed window's would if they
    # were compared with the pace. Compared with what could have been freed, they show
    # a limit that refills, and the credit between readings stays.
    c = Clock()
    h = ceiling(c)
    sends: list[float] = []

    def send_and_read() -> None:
        mark = h.charge(1)
        sends.append(c.now)
        live = [t for t in sends if t > c.now - 6.0]
        h.observe(60, 60 - len(live), live[-1] + 6.0 - c.now, mark, sent_at=c.now)

    for _ in range(6):    # slow start: one a second for the first window
        send_and_read()
        c.now += 1.0
    for _ in range(120):  # then the pace, 10 a second, for two windows
        send_and_read()
        assert h.refills
        c.now += 0.1


def test_a_refused_request_sent_on_credit_stops_the_credit() -> None:
    c = Clock()
    h = ceiling(c)
    h.observe(60, 0, 6.0, h.charge(1), sent_at=c.now)
    c.now += 0.5
    assert h.available() == pytest.approx(5.0)
    on_credit = h.charge(1)
    h.observe(60, 0, 5.5, on_credit, sent_at=c.now, refused=True)
    assert not h.refills and h.available() == 0.0


def test_the_reason_names_the_limit_what_is_left_and_the_reset() -> None:
    c = Clock()
    h = ceiling(c, max_wait=600.0)
    h.observe(6, 0, 86400.0, h.charge(1), sent_at=c.now)
    reason = h.blocked_reason("rpm")
    assert "requests limit" in reason and "0 of 6 left" in reason
    assert "86400 s" in reason and "capped by --max-retry-wait" in reason


# --------------------------------------------------------------------------- the limiter


async def test_headers_pace_the_pool_at_the_limit_per_window() -> None:
    c = Clock(0.0)
    lim = Limiter(Budgets(), 64, clock=c, sleep=c.sleep)
    p = await lim.acquire(1, 1)
    lim.observe(go(600, 0, "60s"), p)
    bucket = lim.buckets["rpm"]
    assert bucket.learned and bucket.rate == pytest.approx(10.0 * PACE_SHARE)


async def test_headers_pace_tokens_too() -> None:
    c = Clock(0.0)
    lim = Limiter(Budgets(), 64, clock=c, sleep=c.sleep)
    p = await lim.acquire(1, 1)
    lim.observe(go(30000, 27000, "6s", kind="tokens"), p)
    assert lim.buckets["tpm"].rate == pytest.approx(5000.0 * PACE_SHARE)


async def test_headers_never_override_a_user_budget_but_their_ceiling_applies() -> None:
    c = Clock(0.0)
    lim = Limiter(Budgets(rpm=600), 64, clock=c, sleep=never)
    p = await lim.acquire(1, 1)
    lim.observe(go(6000, 0, "600s"), p)
    assert not lim.buckets["rpm"].learned
    assert lim.buckets["rpm"].rate == pytest.approx(10.0 * PACE_SHARE)
    lim.ceilings["rpm"].growth = 0.0  # as if a fixed window: nothing until the reset
    blocked = asyncio.ensure_future(lim.acquire(1, 1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not blocked.done()
    blocked.cancel()
    await asyncio.gather(blocked, return_exceptions=True)


async def test_a_long_wait_for_a_reset_is_named_in_the_status(caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    c = Clock(0.0)
    lim = Limiter(Budgets(), 64, clock=c, sleep=never, max_wait=600.0)
    p = await lim.acquire(1, 1)
    lim.observe(go(6, 0, "86400s"), p)  # a daily window, used up
    lim.finish(p, "ok", 1, 1)
    assert lim.describe_wait() is None
    blocked = asyncio.ensure_future(lim.acquire(1, 1))
    for _ in range(5):
        await asyncio.sleep(0)
    text = lim.describe_wait()
    assert text is not None and text.startswith("waiting for the server's requests limit")
    assert "(in 600 s)" in text and "capped by --max-retry-wait" in text
    assert any("waiting for the server's requests limit" in r.message for r in caplog.records)
    blocked.cancel()
    await asyncio.gather(blocked, return_exceptions=True)


async def test_a_new_reading_wakes_a_waiting_pacer_before_the_reset() -> None:
    c = Clock(0.0)
    lim = Limiter(Budgets(), 64, clock=c, sleep=never, max_wait=600.0)
    lim.finish(await lim.acquire(1, 1), "ok", 1, 1)  # slow start: now two in flight
    p, q = await lim.acquire(1, 1), await lim.acquire(1, 1)
    lim.observe(go(6, 0, "86400s"), p)
    lim.finish(p, "ok", 1, 1)
    blocked = asyncio.ensure_future(lim.acquire(1, 1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not blocked.done()
    lim.observe(go(6, 5, "1s"), q)  # the day turned: a later answer says so
    await asyncio.wait_for(blocked, 1)
