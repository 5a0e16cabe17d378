"""`make bench-export` at a few thousand rows, so the benchmark cannot rot; and the
short version of its memory claim: peak RSS does not grow with the rows exported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_export  # noqa: E402


def test_bench_export_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_export.main(["--rows", "1000", "--mid", "0", "--small", "100"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| format | rows | tool | wall s | rows/s | peak RSS MB |" in out
    for fmt in ("jsonl", "sidecar"):
        assert f"| {fmt} | 1,000 | pipeline |" in out and f"| {fmt} | 1,000 | baseline |" in out
        assert f"| **{fmt}: pipeline / baseline** | 1,000 |" in out


def test_peak_rss_at_60k_rows_is_within_50_mb_of_1k_rows(tmp_path: Path) -> None:
    small = bench_export.make_out(tmp_path, 1000)
    large = bench_export.make_out(tmp_path, 60_000)  # three row groups of 20 000
    rss = [bench_export.measure(tmp_path, out, n, "jsonl", "pipeline", 1).maxrss_mb
           for out, n in ((small, 1000), (large, 60_000))]
    assert rss[1] - rss[0] < 50, rss  # pandas: ~700 MB more at 60k rows
