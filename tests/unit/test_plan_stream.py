"""Specification of ``Plan.groups`` on a manifest from standard input: rows start as they
arrive, and a quiet pipe never blocks the event loop (or keeps the process alive)."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from pathlib import Path

import pytest

from pipeline.sources.manifest import Manifest
from pipeline.sources.plan import NamedPrompt, Plan
from pipeline.store.checkpoint import KeySet

PROMPTS = (NamedPrompt("default", "Caption it."),)


@pytest.fixture
def pipe(monkeypatch: pytest.MonkeyPatch):
    """Standard input is the read end of a real pipe; yields the write end."""
    r, w = os.pipe()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.FileIO(r, "rb")))
    writer = os.fdopen(w, "wb", buffering=0)
    yield writer
    if not writer.closed:
        writer.close()


def plan(done: KeySet | None = None) -> Plan:
    return Plan(Manifest(Path("-")), done or KeySet(), PROMPTS, None)


async def test_a_row_starts_while_the_pipe_is_still_open_and_the_loop_runs_on(pipe) -> None:
    pipe.write(b"id,image\nr1,a.png\n")
    groups = plan().groups()
    first = await asyncio.wait_for(anext(_nonempty(groups)), 5)
    assert [r.id for r in first] == ["r1"]
    later = asyncio.create_task(anext(_nonempty(groups)))
    for _ in range(10):  # were the loop blocked on the quiet pipe, none would return
        await asyncio.sleep(0.01)
    assert not later.done()
    pipe.write(b"r2,b.png\n")
    assert [r.id for r in await asyncio.wait_for(later, 5)] == ["r2"]
    pipe.close()
    assert [g async for g in groups if g] == []


async def _nonempty(groups):
    async for g in groups:
        if g:
            yield g


@pytest.mark.timeout(10)  # blocked on the reader thread, asyncio.run would never return
def test_a_run_stopped_while_the_pipe_is_quiet_ends_at_once(pipe) -> None:
    pipe.write(b"id,image\nr1,a.png\n")

    async def consume() -> None:
        groups = plan().groups()
        await anext(_nonempty(groups))  # r1 taken; the reader now waits on the pipe
        await groups.aclose()

    asyncio.run(consume())  # returns although the reader thread is still blocked


async def _drain(p: Plan) -> None:
    async for _ in p.groups():
        pass


async def test_a_read_error_reaches_the_consumer(pipe, monkeypatch) -> None:
    pipe.write(b"id,image\nr1,a.png\n")
    p = plan()

    def broken():
        yield []
        raise OSError("read failed")

    monkeypatch.setattr(Plan, "__iter__", lambda self: broken())
    with pytest.raises(OSError, match="read failed"):
        await _drain(p)
