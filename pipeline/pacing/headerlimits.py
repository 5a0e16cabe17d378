"""What a server's rate-limit headers allow: a hard ceiling until the reset, and a pace.

Every response may carry, per kind (requests, tokens, input and output tokens), a
limit, what remains and the time until the limit is fully replenished
(``x-ratelimit-*``, ``anthropic-ratelimit-*``, LiteLLM's ``llm_provider-`` copies).

* **A ceiling.** ``remaining`` is what may be sent until ``reset``, counting what is
  already on the way: a response tells how much was left when the server answered
  *that* request, so every request sent after it is charged against it. Each reading
  is a lower bound on what is really left; the best one is kept, and a 429's reading
  replaces it (the refusal is proof that the estimate was too high). When the reset
  passes with nothing newer, the full limit is back, less what was sent since the
  reading. A reset longer than ``max_wait`` (``--max-retry-wait``) is capped: then
  one request goes first, to see.
* **Refill between readings.** A reading is already old when it arrives (the server
  counted at admission, the head came after the time to first token), and a token
  bucket or a sliding window frees room continuously meanwhile. So the ceiling grows
  at the pace from the moment the observed request was sent, as long as the readings
  show such growth: a fixed window frees nothing until it turns, and its readings say
  so within a few of them (and a request let through on that credit and refused
  proves it); then the ceiling waits for resets only, until growth shows again.
  Growth is measured against what the limit could have freed: a bucket frees at the
  pace, a sliding window only what was sent one window earlier, so a window after a
  slow start or a pause (little sent then) is no evidence that nothing refills.
* **A pace.** ``limit`` per the longest reset seen is the rate the limit sustains,
  whatever the limiter's kind (a bucket's reset from empty, a window's length). Windows
  longer than ``PACE_HORIZON`` (a daily quota) are not paced, only capped: the quota
  is there to be used, and the run waits, visibly, when it is gone.

Clock is injected; nothing here knows of HTTP beyond the header names.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import parse_duration

Clock = Callable[[], float]
PACE_HORIZON = 120.0  # seconds: a longer window is a quota to use up, not a rate to hold
_HISTORY = 8192  # sends remembered (time, cumulative cost) to measure growth against

# header kind → bucket name; OpenAI, Anthropic, and LiteLLM's re-emitted copies.
HEADER_KINDS = {"requests": "rpm", "tokens": "tpm", "input-tokens": "itpm",
                "output-tokens": "otpm"}
KIND_NAMES = {"rpm": "requests", "tpm": "tokens", "itpm": "input tokens",
              "otpm": "output tokens"}


def read_limits(headers: Mapping[str, str], now: float | None = None
                ) -> dict[str, tuple[float, float, float]]:
    """{bucket: (limit, remaining, seconds until full)} from rate-limit headers."""
    out: dict[str, tuple[float, float, float]] = {}
    for kind, bucket in HEADER_KINDS.items():
        for pattern in ("x-ratelimit-{}-" + kind, "anthropic-ratelimit-" + kind + "-{}",
                        "llm_provider-x-ratelimit-{}-" + kind):
            lim = headers.get(pattern.format("limit"))
            rem = headers.get(pattern.format("remaining"))
            reset = headers.get(pattern.format("reset"))
            if lim is None or rem is None or reset is None:
                continue
            try:
                seconds = parse_duration(reset, time.time() if now is None else now)
                limit, remaining = float(lim), float(rem)
            except ValueError:
                continue
            if seconds is None or not all(map(math.isfinite, (limit, remaining, seconds))) \
                    or limit <= 0 or remaining < 0:
                continue
            out[bucket] = (limit, min(remaining, limit), seconds)
            break
    return out


@dataclass
class _Reading:
    limit: float
    remaining: float
    base: float        # remaining + everything sent up to the observed request
    reset: float       # seconds, as the server said
    deadline: float    # when the ceiling lifts (the reset, capped)
    capped: bool       # the reset was longer than max_wait
    at: float          # when the server counted: the observed request's send time
    after_cap: bool = False  # lifted after a capped reset: one request may go to see


class HeaderCeiling:
    """One kind's hard budget from headers, and the longest reset seen (for the pace)."""

    def __init__(self, clock: Clock, max_wait: float) -> None:
        self.clock = clock
        self.max_wait = max_wait
        self.sent = 0.0    # cumulative cost of every permit granted
        self.window = 0.0  # the longest reset seen up to PACE_HORIZON
        self.limit = 0.0
        self.reading: _Reading | None = None
        # How the readings' room grew, as a share of what the pace would have freed
        # (a moving average; a bucket ~1, a fixed window ~0 between its turns).
        self.growth = 1.0
        self._ref: tuple[float, float] | None = None  # (at, base) to measure growth from
        self._on_credit: deque[float] = deque(maxlen=256)  # requests sent on credit
        self._times: list[float] = []   # when each remembered permit was granted ...
        self._totals: list[float] = []  # ... and ``sent`` just before it

    @property
    def refills(self) -> bool:
        return self.growth >= 0.5

    def charge(self, cost: float) -> float:
        """A permit is granted; returns the counter to hand back with its response."""
        r = self.reading
        on_credit = r is not None and not r.after_cap and self._known() < cost
        self._remember(self.sent)
        self.sent += cost
        if on_credit:
            self._on_credit.append(self.sent)
        return self.sent

    def observe(self, limit: float, remaining: float, reset: float, mark: float,
                sent_at: float | None = None, refused: bool = False) -> None:
        """A reading from the response to the request whose ``charge`` returned ``mark``
        and that was sent at ``sent_at`` (by default: now)."""
        now = self.clock()
        at = now if sent_at is None else min(now, sent_at)
        new = _Reading(limit, remaining, remaining + mark, reset,
                       now + min(reset, self.max_wait), reset > self.max_wait, at)
        if refused and mark in self._on_credit:
            self.growth = 0.0  # refused although room should have freed: it does not
        if limit != self.limit:
            self._ref = None
        self.limit = limit
        if reset <= PACE_HORIZON:
            self.window = max(self.window, reset)
        self._measure_growth(new)
        old = self.reading
        if refused or old is None or now >= old.deadline or new.base >= old.base \
                or limit != old.limit:
            self.reading = new

    def _remember(self, total_before: float) -> None:
        if len(self._times) >= 2 * _HISTORY:  # keep the newest half, in one cut
            del self._times[:_HISTORY], self._totals[:_HISTORY]
        self._times.append(self.clock())
        self._totals.append(total_before)

    def _sent_by(self, t: float) -> float:
        """Cumulative cost granted before ``t`` (as far as remembered)."""
        i = bisect_right(self._times, t)
        if i < len(self._times):
            return self._totals[i]
        return self.sent

    def _could_free(self, start: float, end: float, pace: float) -> float:
        """The most a refilling limit could have freed from ``start`` to ``end``: the
        pace (a bucket), and no more than what was sent one window earlier (a sliding
        window frees exactly that)."""
        w = self.window
        shifted = self._sent_by(end - w) - self._sent_by(start - w)
        return min(pace * (end - start), shifted)

    def _measure_growth(self, new: _Reading) -> None:
        """Compare the room a reading shows with one a few units of pace earlier."""
        pace = self.pace()
        if self._ref is None or pace is None or new.at < self._ref[0]:
            self._ref = (new.at, new.base)
            return
        at, base = self._ref
        if pace * (new.at - at) < max(3.0, 0.05 * self.limit):
            return  # too little time for the difference to say anything
        expected = self._could_free(at, new.at, pace)
        if expected < max(3.0, 0.05 * self.limit):
            return  # too little time for the difference to say anything
        self._ref = (new.at, new.base)
        grown = (new.base - base) / expected
        if grown <= 3.0:  # more is a window turning or a burst ageing out: no evidence
            self.growth = 0.7 * self.growth + 0.3 * min(2.0, max(0.0, grown))

    def _current(self) -> _Reading | None:
        r = self.reading
        if r is not None and self.clock() >= r.deadline:
            r = self._lift(r, self.clock())
        return r

    def _known(self) -> float:
        """What the reading itself leaves, without refill credit."""
        r = self._current()
        if r is None:
            return math.inf
        if r.after_cap:
            return math.inf if self.sent < r.base else 0.0
        return r.base - self.sent

    def available(self) -> float:
        """What may be sent now (inf: nothing known yet)."""
        known = self._known()
        r = self.reading
        pace = self.pace()
        if r is None or r.after_cap or not self.refills or pace is None or known == math.inf:
            return known
        most = r.base - r.remaining + r.limit - self.sent  # never more than a full limit
        return min(most, known + pace * max(0.0, self.clock() - r.at))

    def _lift(self, r: _Reading, now: float) -> _Reading:
        """The reset passed and nothing newer came: the limit is back, less what was
        sent after the reading (or, after a capped reset, one request may go to see)."""
        if r.capped:
            lifted = _Reading(r.limit, 0.0, self.sent + 1e-9, r.reset, now + self.max_wait,
                              True, now, after_cap=True)
        else:
            again = max(r.reset, self.window, 1.0)
            lifted = _Reading(r.limit, r.limit, r.base - r.remaining + r.limit, r.reset,
                              now + again, False, now)
        self.reading = lifted
        return lifted

    def wait(self, cost: float) -> float:
        """Seconds until ``cost`` may go at the latest (a newer reading may come sooner)."""
        short = cost - self.available()
        if short <= 0:
            return 0.0
        r = self.reading
        assert r is not None
        until_reset = max(0.0, r.deadline - self.clock())
        pace = self.pace()
        if self.refills and pace and not r.after_cap:
            return min(until_reset, short / pace)
        return until_reset

    def blocked_reason(self, name: str) -> str:
        r = self.reading
        if r is None:
            return ""
        what = KIND_NAMES.get(name, name)
        left = 0 if r.after_cap else max(0, math.floor(self._known()))
        note = ", capped by --max-retry-wait" if r.capped else ""
        return (f"the server's {what} limit to reset ({left} of {r.limit:g} left, "
                f"reset in {r.reset:.0f} s{note})")

    def pace(self) -> float | None:
        """The rate the limit sustains (per second), if its window is short enough."""
        if self.window <= 0 or self.limit <= 0:
            return None
        return self.limit / self.window
