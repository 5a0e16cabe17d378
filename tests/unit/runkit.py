"""What the specifications of the run session and the local engine share.

A run goes into a real OUT under ``tmp_path`` (lock, journal, Parquet parts, run
report: all real); only the captioning is replaced, at one of two seams:

* ``FakeEngine``: the ``Engine`` protocol itself (``name``, ``async run(session)``),
  scripted per test, for what the session decides (stops, exit codes, the end).
* ``Wire``: the worker's ``Channel`` (wire/channel.py), answering per image URL and
  able to hold a row in flight until the test lets it go, for the local engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.errors import RunFatal
from pipeline.records import (
    ApiRequest,
    Completion,
    ManifestRow,
    ResultRow,
    Usage,
    error_row,
    ok_row,
)
from pipeline.run.session import Engine, RunResult, RunSession, Stop
from pipeline.settings import Secret, Settings
from pipeline.wire.channel import Head, read_capped

BASE_URL = "http://127.0.0.1:9/v1"  # nothing is sent there: the seams answer


def image(rid: str) -> str:
    return f"http://img.test/{rid}.jpg"


def manifest(tmp_path: Path, ids: list[str], name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_text("id,image\n" + "".join(f"{i},{image(i)}\n" for i in ids))
    return path


def settings(tmp_path: Path, ids: list[str], **kw: Any) -> Settings:
    """A run of ``ids`` into ``tmp_path/out``; parts only at the end unless asked."""
    kw.setdefault("flush_rows", 1000)
    kw.setdefault("flush_seconds", 1000.0)
    return Settings(manifest=manifest(tmp_path, ids), out=tmp_path / "out",
                    base_url=BASE_URL, api_key=Secret("sk-unit-test-key"), progress=False,
                    **kw)


def ok(row: ManifestRow, tokens: tuple[int, int] = (10, 2)) -> ResultRow:
    usage = Usage(tokens[0], tokens[1], sum(tokens))
    return ok_row(row, Completion(f"Caption of {row.id}.", "stop", "stop", "m", None, usage,
                                  "done", {}), attempts=1)


def failed(row: ManifestRow) -> ResultRow:
    return error_row(row, "Invalid image.", "bad_image", attempts=1)


Script = Callable[[RunSession], Awaitable[None]]


class FakeEngine:
    """An engine whose ``run`` is the test's script."""

    name = "fake"

    def __init__(self, script: Script) -> None:
        self.script = script

    async def run(self, session: RunSession) -> None:
        await self.script(session)


async def pending(session: RunSession) -> list[ManifestRow]:
    """Every row the plan offers this run."""
    return [row async for group in session.plan.groups() for row in group]


async def keep_all(session: RunSession) -> None:
    for row in await pending(session):
        session.keep(ok(row))


def session(s: Settings, script: Script | Engine) -> RunSession:
    """A session of ``s`` (a script is run as a ``FakeEngine``)."""
    return RunSession(s, script if hasattr(script, "run") else FakeEngine(script))


async def run(s: Settings, script: Script | Engine, seconds: float = 10) -> RunResult:
    """One whole run; one that would wait forever fails the test after ``seconds``
    instead of hanging it."""
    async with asyncio.timeout(seconds):
        return await session(s, script).execute()


# --------------------------------------------------------------------------- stops

BUDGET_NOTE = "cost budget reached: spent $0.0100, $0.0000 in flight, of --max-cost $0.0100"


def auth_failed() -> RunFatal:
    return RunFatal("authentication failed (HTTP 401): Incorrect API key provided", "auth")


async def deliver(session: RunSession, sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig`` to this process for real; return once the session has seen it."""
    seen = session.cancel_now if session.halting else session.stopped
    os.kill(os.getpid(), sig)
    try:
        async with asyncio.timeout(5):
            await seen.wait()
    except TimeoutError:
        pytest.fail(f"the session did not act on {sig.name}")


async def stop(session: RunSession, why: Stop) -> None:
    """Stop the run the way an engine meets ``why``: a real signal, the budget
    (``halt``), a wrong key (``halt`` with the fatal error)."""
    if why is Stop.SIGNAL:
        await deliver(session)
    elif why is Stop.BUDGET:
        session.halt(Stop.BUDGET, note=BUDGET_NOTE)
    else:
        session.halt(Stop.FATAL, auth_failed())


# --------------------------------------------------------------------------- OUT


def rows_in(out: Path) -> dict[str, str]:
    """id → status of every committed row (what a reader of OUT sees)."""
    parts = sorted(out.glob("part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p, columns=["id", "status"]).to_pylist()]
    return {r["id"]: r["status"] for r in rows}


def report(out: Path) -> dict[str, Any]:
    """The run report of the one run into ``out``."""
    (path,) = (out / "_runs").glob("*.json")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- the wire


def sse_ok(text: str) -> list[bytes]:
    def event(doc: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(doc)}\n\n".encode()

    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    return [event({"id": "c", "choices": [choice]}),
            event({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            event({"id": "c", "choices": [], "usage": {"prompt_tokens": 1000,
                                                       "completion_tokens": 10,
                                                       "total_tokens": 1010}}),
            b"data: [DONE]\n\n"]


SSE = {"content-type": "text/event-stream"}
AUTH_FAILED = (401, {"content-type": "application/json"},
               [b'{"error":{"message":"Incorrect API key provided","code":"invalid_api_key"}}'])


class Wire:
    """A ``Channel`` that answers by manifest id (from the image URL): ``answers[rid]``
    is (status, headers, chunks), an ok stream by default. ``hold(rid)``: that row's
    body waits, headers sent, until ``release(rid)``. ``sent`` lists the requests in
    order; ``in_flight(n)`` waits until n were opened."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, dict[str, str], list[bytes]]] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.sent: list[str] = []
        self.closed_early: list[str] = []  # requests the client gave up mid-body
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> Wire:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def hold(self, *ids: str) -> None:
        for rid in ids:
            self.gates[rid] = asyncio.Event()

    def release(self, rid: str) -> None:
        self.gates[rid].set()

    async def in_flight(self, count: int) -> None:
        """Until ``count`` requests were opened."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.sent) >= count)

    @asynccontextmanager
    async def open(self, req: ApiRequest) -> AsyncIterator[tuple[Head, AsyncIterator[bytes]]]:
        rid = _row_id(req)
        async with self._changed:
            self.sent.append(rid)
            self._changed.notify_all()
        status, headers, chunks = self.answers.get(rid, (200, SSE, sse_ok(f"Caption {rid}.")))
        gate = self.gates.get(rid)

        async def body() -> AsyncIterator[bytes]:
            try:
                if gate is not None:
                    await gate.wait()
                for c in chunks:
                    yield c
            except asyncio.CancelledError:
                self.closed_early.append(rid)
                raise

        yield Head(status, headers), body()

    async def read_body(self, chunks: AsyncIterator[bytes], limit: int = 1 << 16) -> bytes:
        return await read_capped(chunks, limit)


def _row_id(req: ApiRequest) -> str:
    """The manifest id, from the image URL in the request (``image(rid)``)."""
    for part in json.loads(req.body)["messages"][-1]["content"]:
        if part.get("type") == "image_url":
            return part["image_url"]["url"].rsplit("/", 1)[1].removesuffix(".jpg")
    raise AssertionError("no image in the request")
