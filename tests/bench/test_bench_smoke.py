"""`make bench` at tiny sizes, so the benchmark cannot rot between releases.

The same code paths as the real benchmark (simulator and clients as separate
processes, ``wait4`` accounting, the generated 1 M-row inputs at a few thousand rows,
the tables) in about 15 seconds. The numbers are not checked, only that every part
runs, every row is captioned and the tables come out. The openai baseline needs the
``openai`` package (``pip install -e '.[bench]'``); without it that test is skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_client  # noqa: E402
import bench_ratelimit  # noqa: E402
import bench_scale  # noqa: E402

from pipeline.records import output_schema  # noqa: E402
from pipeline.store.checkpoint import Checkpoint  # noqa: E402


def test_client_throughput_table_pipeline_only(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_client.main(["--images", "40", "--concurrency", "8", "--repeats", "1",
                              "--caption-tokens", "20", "--no-baseline"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| client | concurrency | images/s | client CPU s / 1k images | peak RSS MB" in out
    assert "| pipeline | 8 |" in out
    assert "~20 tokens per caption" in out  # the simulator's captions were lengthened


@pytest.mark.skipif(not bench_client.have_openai(),
                    reason="the openai SDK baseline needs the 'openai' package "
                           "(pip install -e '.[bench]'); the pipeline side still runs above")
def test_client_throughput_against_the_openai_baseline(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_client.main(["--images", "30", "--concurrency", "8", "--repeats", "1",
                              "--caption-tokens", "20"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| baseline | 8 |" in out
    assert "| **pipeline / baseline** | 8 |" in out
    assert "throughput >= 2x the baseline at concurrency 8" in out


def test_scale_tables(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_scale.main(["--rows", "3000", "--small", "100", "--limit", "60",
                             "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| 100 | 60 |" in out or "| 100 | 100 |" in out  # the small manifest, captioned
    assert "| 3,000 | 60 |" in out  # the large one, stopped at --limit
    assert "| finished rows in OUT | start to first request s |" in out
    assert "resume with 3,000 rows done: first request <= 5 s" in out


def test_generated_out_is_what_the_pipeline_reads(tmp_path: Path) -> None:
    parts = bench_scale.write_finished_out(tmp_path / "out", 2500, ["img/a.png", "img/b.png"],
                                           part_rows=1000)
    assert len(parts) == 3
    assert pq.ParquetFile(parts[0]).schema_arrow == output_schema([])
    state = Checkpoint(tmp_path / "out").load(retry_errors=False)
    assert (state.rows_ok, state.rows_error, state.duplicates_removed) == (2500, 0, 0)
    t = pq.read_table(parts[-1], columns=["id", "status", "dedup_key"])
    assert t["id"][0].as_py() == "r0002000" and t["status"][0].as_py() == "ok"
    assert len(t["dedup_key"][0].as_py()) == 32


def test_ratelimit_table(capsys: pytest.CaptureFixture[str]) -> None:
    # One limiter kind, one bound, one mode, a 1 s window: the matrix's code path.
    code = bench_ratelimit.main(["--images", "30", "--kinds", "sliding", "--bounds", "rpm",
                                 "--modes", "budget", "--window", "1", "--rpm", "20"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| limiter | bound | mode | % of limit used | % 429 |" in out
    assert "| sliding | rpm | budget |" in out
