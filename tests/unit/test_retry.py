"""Specification of pipeline/retry.py: RetryPolicy decides how often and how long to wait.

Randomness is injected (``rand``), so every schedule below is exact. ``attempts_done``
counts attempts already made (1 after the first failure).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.pacing.retry import RetryPolicy


def const(x: float) -> Callable[[], float]:
    return lambda: x


def seq(*values: float) -> Callable[[], float]:
    it: Iterator[float] = iter(values)
    return lambda: next(it)


def never() -> float:
    raise AssertionError("rand must not be called when the server gave a wait")


# --------------------------------------------------------------------------- may_retry


def test_default_policy_allows_five_retries_after_the_first_attempt() -> None:
    p = RetryPolicy()
    assert [p.may_retry(n) for n in range(1, 8)] == [True] * 5 + [False] * 2


def test_retries_zero_means_one_attempt_only() -> None:
    assert RetryPolicy(retries=0).may_retry(1) is False


def test_may_retry_allows_exactly_retries_more_attempts() -> None:
    p = RetryPolicy(retries=3)
    assert p.may_retry(3) is True
    assert p.may_retry(4) is False


@given(st.integers(0, 50))
def test_total_attempts_are_one_plus_retries(retries: int) -> None:
    p = RetryPolicy(retries=retries)
    attempts = 1
    while p.may_retry(attempts):
        attempts += 1
    assert attempts == retries + 1


# --------------------------------------------------------------------------- backoff schedule


def test_backoff_ceiling_doubles_from_base_with_rand_one() -> None:
    p = RetryPolicy(base=1.0, cap=1000.0, rand=const(1.0))
    assert [p.next_delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_backoff_jitters_within_the_upper_half_of_each_step() -> None:
    p = RetryPolicy(base=1.0, cap=1000.0, rand=seq(0.0, 0.5, 1.0, 0.0))
    assert [p.next_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.5, 4.0, 4.0]


@given(r1=st.floats(0.0, 1.0), r2=st.floats(0.0, 1.0), step=st.integers(1, 30),
       base=st.floats(0.01, 10.0), cap=st.floats(0.01, 120.0))
def test_one_rows_backoff_never_shrinks_from_step_to_step(r1: float, r2: float, step: int,
                                                          base: float, cap: float) -> None:
    # Below the cap a step never waits less than any earlier step could: retries slow down.
    first = RetryPolicy(base=base, cap=cap, rand=const(r1)).backoff(step)
    second = RetryPolicy(base=base, cap=cap, rand=const(r2)).backoff(step + 1)
    if base * 2 ** step <= cap:
        assert second >= first


def test_backoff_ceiling_stops_at_cap() -> None:
    p = RetryPolicy(base=1.0, cap=10.0, rand=const(1.0))
    assert [p.next_delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_cap_below_base_bounds_the_first_delay() -> None:
    p = RetryPolicy(base=5.0, cap=2.0, rand=const(1.0))
    assert p.next_delay(1) == 2.0


def test_no_step_means_no_backoff() -> None:
    assert RetryPolicy(base=3.0, rand=const(1.0)).backoff(0) == 0.0


def test_zero_base_means_no_backoff() -> None:
    p = RetryPolicy(base=0.0, rand=const(0.9))
    assert [p.next_delay(n) for n in range(1, 5)] == [0.0] * 4


def test_huge_attempt_count_stays_at_cap() -> None:
    assert RetryPolicy(base=1.0, cap=60.0, rand=const(1.0)).next_delay(200) == 60.0


@given(attempt=st.integers(1, 40), r=st.floats(0.0, 1.0),
       base=st.floats(0.0, 10.0), cap=st.floats(0.0, 120.0))
def test_backoff_stays_within_half_and_the_whole_ceiling(attempt: int, r: float, base: float,
                                                         cap: float) -> None:
    d = RetryPolicy(base=base, cap=cap, rand=const(r)).next_delay(attempt)
    ceiling = min(cap, base * 2 ** (attempt - 1))
    assert ceiling / 2 <= d <= ceiling


# --------------------------------------------------------------------------- Retry-After


def test_retry_after_is_honoured_as_given() -> None:
    p = RetryPolicy(base=1.0, cap=10.0, rand=never)
    assert p.next_delay(1, retry_after=7.0) == 7.0


def test_retry_after_above_backoff_cap_is_still_honoured() -> None:
    p = RetryPolicy(base=1.0, cap=10.0, rand=never)
    assert p.next_delay(1, retry_after=45.0) == 45.0


def test_retry_after_is_limited_to_max_server_wait() -> None:
    p = RetryPolicy(max_server_wait=600.0, rand=never)
    assert p.next_delay(1, retry_after=3600.0) == 600.0


@pytest.mark.parametrize("bad", [0.0, -1.0, -0.001, math.nan, math.inf, -math.inf, None])
def test_retry_after_zero_negative_or_unusable_is_no_guidance(bad: float | None) -> None:
    p = RetryPolicy(base=1.0, cap=60.0, rand=const(1.0))
    assert p.server_wait(bad) is None
    assert p.next_delay(3, retry_after=bad) == 4.0  # the backoff, never a zero wait
    assert p.rate_delay(3, retry_after=bad) == 4.0


def test_retry_after_does_not_depend_on_attempt_number() -> None:
    p = RetryPolicy(rand=never)
    assert {p.next_delay(n, retry_after=2.5) for n in range(1, 6)} == {2.5}


def test_missing_retry_after_uses_backoff() -> None:
    p = RetryPolicy(base=2.0, cap=60.0, rand=const(0.5))
    assert p.next_delay(2, retry_after=None) == 3.0  # within [2, 4]


# --------------------------------------------------------------------------- rate limiting


def test_a_rate_refusal_honours_retry_after_the_first_time() -> None:
    p = RetryPolicy(base=1.0, cap=60.0, rand=never)
    assert p.rate_delay(1, retry_after=0.2) == 0.2


def test_repeated_rate_refusals_wait_at_least_the_previous_steps_backoff() -> None:
    # A server that keeps saying "in 1 s" and keeps refusing is slowed down anyway.
    p = RetryPolicy(base=1.0, cap=60.0, rand=const(1.0))
    assert [p.rate_delay(n, retry_after=1.0) for n in range(1, 7)] == [1, 1, 2, 4, 8, 16]


def test_an_unguided_rate_refusal_backs_off_like_any_failure() -> None:
    p = RetryPolicy(base=1.0, cap=60.0, rand=const(1.0))
    assert [p.rate_delay(n) for n in range(1, 5)] == [1.0, 2.0, 4.0, 8.0]


def test_the_pool_pause_grows_by_half_per_refusal_in_a_row() -> None:
    p = RetryPolicy(base=1.0, cap=60.0, rand=const(1.0))
    assert [p.pool_delay(n) for n in range(1, 5)] == [1.0, 1.5, 2.25, 3.375]
    assert p.pool_delay(200) == 60.0


def test_the_pool_pause_honours_retry_after_then_grows_from_it() -> None:
    p = RetryPolicy(base=1.0, cap=60.0, rand=const(1.0))
    assert [p.pool_delay(n, retry_after=2.0) for n in range(1, 5)] == [2.0, 2.0, 2.0, 2.25]


def test_rate_waiting_has_its_own_bound_of_tens_of_minutes() -> None:
    p = RetryPolicy()
    assert p.max_rate_wait == 1800.0
    assert p.retries == 5  # unrelated: rate refusals do not use them up


# --------------------------------------------------------------------------- value semantics


def test_policies_with_same_numbers_compare_equal_whatever_rand() -> None:
    assert RetryPolicy(3, 1.0, 5.0, 60.0, rand=const(0.1)) == RetryPolicy(3, 1.0, 5.0, 60.0,
                                                                        rand=const(0.9))


def test_policy_is_immutable() -> None:
    p = RetryPolicy()
    with pytest.raises(AttributeError):
        p.retries = 9  # type: ignore[misc]
