"""Specification of the run session (run/session.py): what every engine gets from it.

The engine here is a script at the ``Engine`` seam (``runkit.FakeEngine``) that takes
the plan's rows, keeps result rows and stops the run the ways a real engine does:
``session.halt``, or a real signal to this process. OUT is a real directory: the
assertions read its Parquet parts and its run report. Writes that fail and the sink's
cap: test_session_output.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest
from runkit import (
    BUDGET_NOTE,
    auth_failed,
    deliver,
    failed,
    keep_all,
    ok,
    pending,
    report,
    rows_in,
    run,
    settings,
    stop,
)

from pipeline.errors import RunFatal
from pipeline.run.session import RunSession, Stop

# --------------------------------------------------------------------------- a whole run


async def test_every_kept_row_is_committed_and_the_run_exits_0(tmp_path: Path) -> None:
    s = settings(tmp_path, ["a", "b", "c"])
    result = await run(s, keep_all)
    assert result.exit_code == 0 and result.fatal is None
    assert rows_in(s.out) == {"a": "ok", "b": "ok", "c": "ok"}


async def test_one_failed_row_makes_the_exit_code_1(tmp_path: Path) -> None:
    async def script(session: RunSession) -> None:
        for row in await pending(session):
            session.keep(failed(row) if row.id == "b" else ok(row))

    s = settings(tmp_path, ["a", "b"])
    assert (await run(s, script)).exit_code == 1
    assert rows_in(s.out) == {"a": "ok", "b": "error"}


async def test_the_report_and_summary_say_how_the_run_ended_without_the_key(
        tmp_path: Path) -> None:
    async def script(session: RunSession) -> None:
        a, b = await pending(session)
        session.keep(ok(a, tokens=(100, 7)))
        session.keep(failed(b))

    s = settings(tmp_path, ["a", "b"])
    result = await run(s, script)
    r = report(s.out)
    assert (r["exit_code"], r["ok"], r["failed"], r["engine"]) == (1, 1, 1, "fake")
    assert (r["tokens_in"], r["tokens_out"]) == (100, 7)
    assert r["error_classes"] == {"bad_image": 1} and r["interrupted"] is None
    assert "api_key" not in r["options"] and "sk-unit-test-key" not in json.dumps(r)
    assert result.summary.startswith("summary: ok=1 failed=1 (bad_image=1) skipped=0")


async def test_parts_are_merged_at_the_end_of_a_complete_run(tmp_path: Path) -> None:
    s = settings(tmp_path, ["a", "b", "c", "d"], flush_rows=1)

    async def script(session: RunSession) -> None:
        for row in await pending(session):
            session.keep(ok(row))
            while session.sink.buffered:  # one part per row while the run works
                await asyncio.sleep(0.01)

    await run(s, script)
    assert len(list(s.out.glob("part-*.parquet"))) == 1
    assert rows_in(s.out) == dict.fromkeys("abcd", "ok")


async def test_a_stopped_run_leaves_its_parts_unmerged(tmp_path: Path) -> None:
    s = settings(tmp_path, ["a", "b", "c"], flush_rows=1)

    async def script(session: RunSession) -> None:
        for row in (await pending(session))[:2]:
            session.keep(ok(row))
            while session.sink.buffered:
                await asyncio.sleep(0.01)
        session.halt(Stop.BUDGET, note=BUDGET_NOTE)

    await run(s, script)
    assert len(list(s.out.glob("part-*.parquet"))) == 2


async def test_a_second_run_into_the_same_out_exits_4(tmp_path: Path) -> None:
    s = settings(tmp_path, ["a"])
    refused: list[RunFatal] = []

    async def script(session: RunSession) -> None:
        with pytest.raises(RunFatal) as info:  # while this run holds OUT
            await run(s, keep_all)
        refused.append(info.value)

    assert (await run(s, script)).exit_code == 0
    (e,) = refused
    assert e.exit_code == 4 and "locked by another run" in e.message


# --------------------------------------------------------------------------- resume


async def test_keys_done_are_not_offered_again(tmp_path: Path) -> None:
    s = settings(tmp_path, ["a", "b", "c"])

    async def first(session: RunSession) -> None:
        for row in await pending(session):
            if row.id != "c":  # c never finishes in the first run
                session.keep(ok(row))

    await run(s, first)
    offered: list[str] = []

    async def second(session: RunSession) -> None:
        offered.extend(r.id for r in await pending(session))

    result = await run(s, second)
    assert offered == ["c"] and result.counters.skipped_done == 2


async def test_a_transient_error_row_is_offered_again_and_a_permanent_one_is_not(
        tmp_path: Path) -> None:
    from pipeline.records import error_row

    s = settings(tmp_path, ["bad", "busy"])

    async def first(session: RunSession) -> None:
        bad, busy = await pending(session)
        session.keep(failed(bad))  # bad_image: permanent
        session.keep(error_row(busy, "HTTP 503", "server", attempts=6))

    await run(s, first)
    offered: list[str] = []

    async def second(session: RunSession) -> None:
        offered.extend(r.id for r in await pending(session))

    await run(s, second)
    assert offered == ["busy"]


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                      (signal.SIGHUP, 129)])
async def test_a_signal_stops_the_run_with_its_exit_code(tmp_path: Path,
                                                         sig: signal.Signals,
                                                         code: int) -> None:
    async def script(session: RunSession) -> None:
        session.keep(ok((await pending(session))[0]))
        await deliver(session, sig)

    s = settings(tmp_path, ["a", "b"])
    result = await run(s, script)
    assert result.exit_code == code
    assert report(s.out)["interrupted"] == sig.name


async def test_rows_finished_before_a_signal_are_committed(tmp_path: Path) -> None:
    async def script(session: RunSession) -> None:
        a, _b = await pending(session)
        session.keep(ok(a))
        await deliver(session)

    s = settings(tmp_path, ["a", "b"])  # no part is due before the end
    await run(s, script)
    assert rows_in(s.out) == {"a": "ok"}


async def test_the_first_signal_leaves_rows_in_flight_their_grace(tmp_path: Path) -> None:
    graced: list[bool] = []

    async def script(session: RunSession) -> None:
        await deliver(session)
        graced.append(session.halting and not session.cancel_now.is_set())

    await run(settings(tmp_path, ["a"]), script)
    assert graced == [True]


async def test_a_second_signal_cancels_rows_in_flight_at_once(tmp_path: Path) -> None:
    async def script(session: RunSession) -> None:
        await deliver(session)
        await deliver(session)  # returns once cancel_now is set

    result = await run(settings(tmp_path, ["a"]), script)
    assert result.exit_code == 143


async def test_a_fatal_error_while_draining_ends_the_grace(tmp_path: Path) -> None:
    async def script(session: RunSession) -> None:
        await deliver(session)
        session.halt(Stop.FATAL, auth_failed())
        assert session.cancel_now.is_set()

    result = await run(settings(tmp_path, ["a"]), script)
    assert result.exit_code == 143  # the first reason still names the stop


# --------------------------------------------------------------------------- stops


async def test_a_fatal_stop_exits_3_with_its_one_line_and_cancels_at_once(
        tmp_path: Path) -> None:
    cancelled: list[bool] = []

    async def script(session: RunSession) -> None:
        session.keep(ok((await pending(session))[0]))
        session.halt(Stop.FATAL, auth_failed())
        cancelled.append(not session.stop.with_grace)  # type: ignore[union-attr]

    s = settings(tmp_path, ["a", "b"])
    result = await run(s, script)
    assert result.exit_code == 3 and cancelled == [True]
    assert result.fatal == auth_failed().message
    assert rows_in(s.out) == {"a": "ok"}  # what finished before is kept


async def test_a_run_fatal_raised_by_the_engine_is_a_fatal_stop(tmp_path: Path) -> None:
    async def script(session: RunSession) -> None:
        raise RunFatal("ray: cannot connect to the cluster", "engine", exit_code=2)

    result = await run(settings(tmp_path, ["a"]), script)
    assert (result.exit_code, result.fatal) == (2, "ray: cannot connect to the cluster")


async def test_the_budget_stops_the_run_with_exit_5_and_its_note(tmp_path: Path) -> None:
    async def script(session: RunSession) -> None:
        session.keep(ok((await pending(session))[0]))
        session.halt(Stop.BUDGET, note=BUDGET_NOTE)
        assert not session.cancel_now.is_set()  # rows in flight finish

    s = settings(tmp_path, ["a", "b"])
    result = await run(s, script)
    assert (result.exit_code, result.fatal) == (5, BUDGET_NOTE)
    assert report(s.out)["note"] == BUDGET_NOTE
    assert rows_in(s.out) == {"a": "ok"}


@pytest.mark.parametrize("first,then,code", [
    (Stop.BUDGET, Stop.SIGNAL, 5), (Stop.SIGNAL, Stop.BUDGET, 143),
    (Stop.BUDGET, Stop.FATAL, 5), (Stop.FATAL, Stop.BUDGET, 3),
    (Stop.FATAL, Stop.SIGNAL, 3),
])
async def test_the_first_stop_reason_wins(tmp_path: Path, first: Stop, then: Stop,
                                          code: int) -> None:
    async def script(session: RunSession) -> None:
        await stop(session, first)
        await stop(session, then)

    assert (await run(settings(tmp_path, ["a"]), script)).exit_code == code
