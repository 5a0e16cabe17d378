"""`make bench-sources` at tiny sizes, so the benchmark cannot rot: every source is
generated, read through the planner in a process of its own, and tabled."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sources  # noqa: E402


def test_sources_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_sources.main(["--rows", "3000", "--small", "100", "--shards", "2",
                               "--members", "40"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| source | rows | read rows/s | vs CSV | read peak RSS MB | large / small |" in out
    for row in ("| csv | 3,000 |", "| jsonl | 3,000 |", "| parquet | 3,000 |",
                "| webdataset | 80 |"):
        assert row in out
    assert "memory while reading: largest / smallest peak RSS at most" in out
