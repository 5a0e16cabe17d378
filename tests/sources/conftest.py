"""The simulator (a real HTTP server on 127.0.0.1) for the source tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.simulator.app import SimConfig
from pipeline.simulator.thread import SimThread

from .helpers import API_KEY


@pytest.fixture(scope="session")
def sim() -> Iterator[SimThread]:
    s = SimThread(SimConfig(latency=0.0, tokens_per_second=0.0))
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTION_API_KEY", API_KEY)
