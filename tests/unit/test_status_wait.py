"""The status line names a long wait (pipeline/progress.py's waiting hook, fed by the
limiter's ``describe_wait``), in text and in JSON lines; without one it says nothing."""

from __future__ import annotations

import io
import json

from pipeline.run.progress import Counters, Progress

WAIT = "waiting for the server's requests limit to reset until 14:02:10 (in 598 s)"


def progress(json_lines: bool = False) -> Progress:
    return Progress(Counters(), show_bar=False, stream=io.StringIO(), clock=lambda: 10.0,
                    json_lines=json_lines)


def test_the_status_line_names_the_wait() -> None:
    p = progress()
    p.waiting = lambda: WAIT
    assert p.status_line().endswith("; " + WAIT)


def test_the_json_status_line_carries_the_wait() -> None:
    p = progress(json_lines=True)
    p.waiting = lambda: WAIT
    assert json.loads(p.status_line())["waiting"] == WAIT


def test_without_a_wait_the_status_line_is_as_before() -> None:
    p = progress()
    assert "waiting" not in p.status_line()
    assert "waiting" not in json.loads(progress(json_lines=True).status_line())
