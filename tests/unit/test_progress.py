"""Specification of the progress bar (pipeline/progress.py) and the messages printed
while it is drawn (pipeline/logs.py): what a person watching a terminal sees."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import re
import struct
import termios
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pipeline.logs import setup_logging
from pipeline.records import ResultRow, Status
from pipeline.run.progress import Counters, Progress, terminal_size

FRAME = re.compile(r"(\d+)/(\d+) \[.*ok=(\d+), failed=(\d+)")


def finish(c: Counters, p: Progress, ok: bool) -> None:
    c.record(ResultRow(status=Status.OK if ok else Status.ERROR,
                       error_class=None if ok else "server",
                       error=None if ok else "HTTP 500", prompt_tokens=10,
                       completion_tokens=2))
    p.update(12)


def frames(text: str) -> list[str]:
    return [f for f in re.split(r"[\r\n]", text) if f.strip()]


@contextmanager
def pty(cols: int, rows: int) -> Iterator[tuple[int, Any]]:
    """A real pseudo-terminal that reports ``cols`` x ``rows``: (master fd, slave file)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    f = os.fdopen(slave, "w", encoding="utf-8")
    try:
        yield master, f
    finally:
        f.close()
        os.close(master)


def read_all(master: int) -> str:
    os.set_blocking(master, False)
    chunks = []
    try:
        while chunk := os.read(master, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks).decode("utf-8", "replace")


def test_every_frame_of_the_bar_shows_counts_that_add_up_to_its_position() -> None:
    c, out = Counters(), io.StringIO()
    p = Progress(c, show_bar=True, stream=out, bar_interval=0)
    p.set_total(80)
    for i in range(46):
        finish(c, p, ok=i % 7 != 6 or i > 41)        # 40 ok, 6 failed, interleaved
    p.close()
    drawn = [FRAME.search(f) for f in frames(out.getvalue())]
    drawn = [m for m in drawn if m]
    assert len(drawn) >= 10
    for m in drawn:
        n, total, ok, failed = map(int, m.groups())
        assert (n, total) == (ok + failed, 80), m.group(0)
    assert drawn[-1].groups() == ("46", "80", "40", "6")


def test_a_message_prints_on_its_own_line_above_the_bar() -> None:
    c, out = Counters(), io.StringIO()
    p = Progress(c, show_bar=True, stream=out, bar_interval=0)
    p.set_total(4)
    setup_logging(False, False, stream=out)
    try:
        finish(c, p, ok=True)
        logging.getLogger("pipeline").warning("SIGINT: stopping")
        finish(c, p, ok=True)
    finally:
        p.close()
        setup_logging(False, False)                   # back to stderr for later tests
    text = out.getvalue()
    before, after = text.split("WARNING SIGINT: stopping", 1)
    assert re.search(r"\r {20,}\r$", before)          # the bar's line was cleared first
    assert after.startswith("\n")                     # the message ends its own line
    assert FRAME.search(after)                        # and the bar comes back below it


def test_a_terminal_that_reports_no_width_gets_a_full_bar(monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    with pty(0, 0) as (master, tty):
        assert terminal_size(tty) == (80, 24)
        c = Counters()
        p = Progress(c, show_bar=True, stream=tty, bar_interval=0)
        p.set_total(10)
        for _ in range(3):
            finish(c, p, ok=True)
        p.close()
        tty.flush()
        shown = [f for f in frames(read_all(master)) if "3/10" in f]
    assert shown, "nothing was drawn"
    assert 60 <= len(shown[-1]) <= 80 and "|" in shown[-1]


@pytest.mark.parametrize("cols,rows,env,want", [
    (120, 40, None, (120, 40)), (0, 0, "100", (100, 24)), (5, 3, None, (80, 3)),
    (0, 0, "junk", (80, 24)),
])
def test_terminal_size_falls_back_only_where_the_terminal_has_none(monkeypatch, cols, rows,
                                                                   env, want) -> None:
    if env is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", env)
    with pty(cols, rows) as (_, tty):
        assert terminal_size(tty) == want


def test_a_stream_that_is_no_terminal_gets_the_fallback() -> None:
    assert terminal_size(io.StringIO())[0] >= 20
