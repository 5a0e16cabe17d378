"""Specification of the run session (run/session.py) where OUT is involved: a write
that fails stops the run with exit 6 (and outranks a signal or the budget, not a fatal
error); the sink's buffer is capped (``room``) so a slow disk holds the engine back.

As in test_session.py the engine is a script at the ``Engine`` seam; the disk's faults
are put in place of the part and journal writes (a full disk: ENOSPC).
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest
from runkit import (
    BUDGET_NOTE,
    auth_failed,
    keep_all,
    ok,
    pending,
    report,
    rows_in,
    run,
    settings,
    stop,
)

from pipeline.run.session import RunSession, Stop
from pipeline.store.journal import Journal
from pipeline.store.sink import ParquetSink


def disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every part write fails the way a full disk does."""
    def write(self: ParquetSink, batch: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ParquetSink, "write", write)


# --------------------------------------------------------------------------- writes that fail


async def test_a_part_that_cannot_be_written_stops_the_run_with_exit_6(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk_full(monkeypatch)
    s = settings(tmp_path, ["a", "b"])
    result = await run(s, keep_all)
    assert result.exit_code == 6
    assert result.fatal is not None and "No space left on device" in result.fatal
    assert "2 finished rows are not in a part yet" in result.fatal
    assert report(s.out)["exit_code"] == 6  # the report still gets written


async def test_a_journal_that_cannot_be_written_stops_the_run_and_the_row_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def append(self: Journal, row: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Journal, "append", append)
    stopped: list[bool] = []

    async def script(session: RunSession) -> None:
        session.keep(ok((await pending(session))[0]))
        stopped.append(session.halting)

    s = settings(tmp_path, ["a", "b"])
    result = await run(s, script)
    assert result.exit_code == 6 and stopped == [True]
    assert result.fatal is not None and "every finished row was committed" in result.fatal
    assert rows_in(s.out) == {"a": "ok"}


@pytest.mark.parametrize("first", [Stop.SIGNAL, Stop.BUDGET])
async def test_a_failed_write_outranks_the_stop_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: Stop) -> None:
    disk_full(monkeypatch)

    async def script(session: RunSession) -> None:
        session.keep(ok((await pending(session))[0]))
        await stop(session, first)  # the last flush, after this, fails

    result = await run(settings(tmp_path, ["a", "b"]), script)
    assert result.exit_code == 6
    assert result.fatal is not None and "1 finished rows are not in a part yet" in result.fatal


async def test_a_failed_write_does_not_outrank_a_fatal_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk_full(monkeypatch)

    async def script(session: RunSession) -> None:
        session.keep(ok((await pending(session))[0]))
        session.halt(Stop.FATAL, auth_failed())

    result = await run(settings(tmp_path, ["a", "b"]), script)
    assert (result.exit_code, result.fatal) == (3, auth_failed().message)


# --------------------------------------------------------------------------- the sink's cap


def held_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Part writes wait for ``release``; ``writing`` is set once one has started."""
    writing, release = threading.Event(), threading.Event()
    real = ParquetSink.write

    def write(self: ParquetSink, batch: object) -> object:
        writing.set()
        release.wait(10)
        return real(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(ParquetSink, "write", write)
    return writing, release


async def test_room_waits_while_the_sink_holds_four_flushes_of_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writing, release = held_writes(monkeypatch)
    s = settings(tmp_path, [f"r{i:02d}" for i in range(10)], flush_rows=2)  # cap: 8 rows

    async def script(session: RunSession) -> None:
        rows = await pending(session)
        for row in rows[:2]:
            session.keep(ok(row))
        await asyncio.to_thread(writing.wait, 5)  # those two are being written, slowly
        for row in rows[2:]:
            session.keep(ok(row))
        assert session.sink.buffered == 8
        room = asyncio.create_task(session.room())
        await asyncio.sleep(0.2)  # room polls every 0.05 s: it had four looks
        assert not room.done()
        release.set()
        await room  # the part is written, the next one taken: there is room again
        assert session.sink.buffered < 8

    await run(s, script)
    assert len(rows_in(s.out)) == 10


async def test_room_does_not_wait_below_the_cap(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    writing, release = held_writes(monkeypatch)
    s = settings(tmp_path, [f"r{i:02d}" for i in range(9)], flush_rows=2)

    async def script(session: RunSession) -> None:
        rows = await pending(session)
        for row in rows[:2]:
            session.keep(ok(row))
        await asyncio.to_thread(writing.wait, 5)
        for row in rows[2:]:
            session.keep(ok(row))
        assert session.sink.buffered == 7
        room = asyncio.create_task(session.room())
        await asyncio.sleep(0)  # one turn of the loop
        assert room.done()
        release.set()

    await run(s, script)


async def test_room_does_not_wait_once_the_run_stops(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    writing, release = held_writes(monkeypatch)
    s = settings(tmp_path, [f"r{i:02d}" for i in range(10)], flush_rows=2)

    async def script(session: RunSession) -> None:
        rows = await pending(session)
        for row in rows[:2]:
            session.keep(ok(row))
        await asyncio.to_thread(writing.wait, 5)
        for row in rows[2:]:
            session.keep(ok(row))
        room = asyncio.create_task(session.room())
        session.halt(Stop.BUDGET, note=BUDGET_NOTE)
        await room  # a stopping run is not held up by a slow disk
        release.set()

    await run(s, script)
