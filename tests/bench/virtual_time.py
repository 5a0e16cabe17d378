"""A virtual clock for developing pacing: the real client against the real simulator,
in one event loop whose time jumps to the next timer whenever nothing is ready.

NOT a measurement (CPU time is free here); `bench_ratelimit.py --virtual` uses it to
try a matrix in seconds while tuning, and the real-time run is what the README quotes.
Import this module before anything of `pipeline`: it replaces ``time.monotonic`` so
that every default clock (bound when the modules are imported) is the virtual one.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from typing import Any

_real_monotonic = time.monotonic
_now = [_real_monotonic()]


def virtual_monotonic() -> float:
    return _now[0]


class _Selector(selectors.DefaultSelector):
    """Poll for real (briefly: loopback bytes are there at once); if nothing is ready,
    let the virtual clock jump to the next timer instead of waiting for it."""

    def select(self, timeout: float | None = None) -> list[Any]:
        # Every turn of the loop costs a little time, as it would for real; without it a
        # wait shorter than the loop's clock resolution would spin forever.
        _now[0] += 1e-5
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        ready = super().select(0.001)  # a thread's result, a connect in progress
        if ready:
            return ready
        if timeout is None:
            timeout = 0.05  # nothing scheduled: only real I/O can wake us
        _now[0] += timeout
        return []


def install() -> None:
    time.monotonic = virtual_monotonic  # type: ignore[assignment]


def new_loop() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(_Selector())
