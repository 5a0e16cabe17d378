"""Specification of the local engine (engines/local.py) on a real session and OUT.

The worker's transport is ``runkit.Wire``, a ``Channel`` in memory that holds chosen
rows in flight until the test lets them go, so "in flight when the run stopped" is a
fact of the test, not a race; nothing waits on a timer to decide an outcome.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from runkit import AUTH_FAILED, Wire, rows_in, run, session, settings

from pipeline.engines.local import LocalEngine
from pipeline.run.session import RunResult, RunSession
from pipeline.settings import Settings

IDS = [f"r{i:02d}" for i in range(40)]


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Wire:
    """The ``Wire`` the workers of the test's runs talk to, in place of the aiohttp
    transport (the test scripts ``answers`` and holds rows before the run)."""
    w = Wire()
    monkeypatch.setattr("pipeline.run.stack.Transport", lambda *args, **kw: w)
    return w


async def turns(n: int = 50) -> None:
    """Let the loop run ``n`` times (the engine acts on a stop within a few)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def signal_once_in_flight(session_: RunSession, wire: Wire, count: int) -> None:
    """SIGTERM for real once ``count`` requests are open; return once the engine is
    past the stop (cancelling what may be cancelled, waiting out the grace)."""
    await wire.in_flight(count)
    os.kill(os.getpid(), signal.SIGTERM)
    await session_.stopped.wait()
    await turns()


async def started(s: Settings) -> tuple[RunSession, asyncio.Task[RunResult]]:
    sess = session(s, LocalEngine())
    return sess, asyncio.create_task(asyncio.wait_for(sess.execute(), 10))


async def test_the_queue_holds_at_most_twice_the_concurrency_rows_ahead(
        tmp_path: Path, wire: Wire) -> None:
    wire.hold(*IDS)
    sess, task = await started(settings(tmp_path, IDS, concurrency=2, grace=0))
    await wire.in_flight(2)
    await turns()  # the producer fills the queue, then waits for room
    # 2 rows in requests, 4 in the queue, 1 in the producer's hand waiting for room
    assert sess.counters.plan.pending <= 2 + 2 * 2 + 1
    assert len(wire.sent) == 2
    os.kill(os.getpid(), signal.SIGTERM)
    assert (await task).exit_code == 143


async def test_rows_in_flight_at_a_signal_finish_within_the_grace(tmp_path: Path,
                                                                  wire: Wire) -> None:
    wire.hold("a", "b")
    s = settings(tmp_path, ["a", "b", "c"], concurrency=2, grace=60)
    sess, task = await started(s)
    await signal_once_in_flight(sess, wire, 2)
    wire.release("a")
    wire.release("b")
    assert (await task).exit_code == 143
    assert rows_in(s.out) == {"a": "ok", "b": "ok"}
    assert sorted(wire.sent) == ["a", "b"]  # c was queued: not sent after the signal


async def test_a_row_waiting_to_retry_at_a_signal_does_not_cut_the_grace_of_rows_in_flight(
        tmp_path: Path, wire: Wire) -> None:
    # "b" sleeps before its retry (no request open): the stop cancels it at once, and
    # that must not end the wait for "a", whose request is open.
    wire.hold("a")
    wire.answers["b"] = (500, {"content-type": "application/json"},
                         [b'{"error": {"message": "boom", "type": "server_error"}}'])
    s = settings(tmp_path, ["a", "b"], concurrency=2, grace=60, backoff_base=600.0,
                 backoff_max=600.0)
    sess, task = await started(s)
    await wire.in_flight(2)
    await turns()  # "b" took in its 500 and sleeps
    await signal_once_in_flight(sess, wire, 2)
    wire.release("a")
    assert (await task).exit_code == 143
    assert rows_in(s.out) == {"a": "ok"} and wire.closed_early == []


async def test_a_row_still_in_flight_when_the_grace_ends_stays_pending(
        tmp_path: Path, wire: Wire) -> None:
    wire.hold("a")
    s = settings(tmp_path, ["a"], concurrency=1, grace=0.05)
    sess, task = await started(s)
    await signal_once_in_flight(sess, wire, 1)  # "a" is never released
    assert (await task).exit_code == 143
    assert wire.closed_early == ["a"] and rows_in(s.out) == {}


async def test_a_second_signal_cancels_rows_in_flight_at_once(tmp_path: Path,
                                                             wire: Wire) -> None:
    wire.hold("a")
    s = settings(tmp_path, ["a"], concurrency=1, grace=600)
    sess, task = await started(s)  # the 10 s bound of ``started`` is far below the grace
    await signal_once_in_flight(sess, wire, 1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert (await task).exit_code == 143
    assert wire.closed_early == ["a"] and rows_in(s.out) == {}


async def test_a_fatal_error_cancels_rows_in_flight_at_once(tmp_path: Path,
                                                           wire: Wire) -> None:
    wire.hold("a")
    wire.answers["deny"] = AUTH_FAILED
    s = settings(tmp_path, ["a", "deny", "b"], concurrency=2, grace=600)
    result = await run(s, LocalEngine())  # bounded at 10 s, far below the grace
    assert result.exit_code == 3
    assert result.fatal is not None and "authentication failed" in result.fatal
    assert wire.closed_early == ["a"] and rows_in(s.out) == {}
    assert "b" not in wire.sent


async def test_the_budget_stops_taking_rows_and_the_row_in_flight_finishes(
        tmp_path: Path, wire: Wire) -> None:
    wire.hold("a", "b")
    # Each request reserves max_tokens (300) × $1000/M = $0.30: one fits in $0.50.
    s = settings(tmp_path, ["a", "b", "c"], concurrency=2, grace=60, price_in=0.0,
                 price_out=1000.0, max_cost=0.5)
    sess, task = await started(s)
    await wire.in_flight(1)
    await sess.stopped.wait()  # the second row's reservation did not fit
    await turns()
    (in_flight,) = wire.sent
    wire.release(in_flight)
    result = await task
    assert result.exit_code == 5
    assert rows_in(s.out) == {in_flight: "ok"}


async def test_rows_left_in_the_queue_at_a_stop_are_sent_by_the_next_run(
        tmp_path: Path, wire: Wire) -> None:
    wire.hold("a")
    ids = ["a", "b", "c", "d"]
    s = settings(tmp_path, ids, concurrency=1, grace=60)
    sess, task = await started(s)
    await signal_once_in_flight(sess, wire, 1)
    wire.release("a")
    await task
    assert rows_in(s.out) == {"a": "ok"} and wire.sent == ["a"]
    wire.sent.clear()
    assert (await run(s, LocalEngine())).exit_code == 0
    assert sorted(wire.sent) == ["b", "c", "d"]
    assert rows_in(s.out) == dict.fromkeys(ids, "ok")


async def test_a_manifest_that_gives_a_known_id_another_image_stops_before_sending(
        tmp_path: Path, wire: Wire) -> None:
    s = settings(tmp_path, ["a", "b"])
    assert (await run(s, LocalEngine())).exit_code == 0
    s.manifest.write_text("id,image\nb,http://img.test/other.jpg\nc,http://img.test/c.jpg\n")
    wire.sent.clear()
    result = await run(s, LocalEngine())
    assert result.exit_code == 2
    assert result.fatal is not None and "id 'b' is in" in result.fatal
    assert wire.sent == []
