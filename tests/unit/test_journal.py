"""The journal: finished rows survive the death of the process, a torn tail is skipped."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.records import output_schema
from pipeline.store.journal import Journal, decode, encode, recover, segments
from pipeline.store.sink import ParquetSink, recover_journal

ROW = {"id": "a", "prompt_name": "default", "status": "ok", "caption": "A kayak \U0001f680.",
       "finished_at": datetime(2026, 1, 1, tzinfo=UTC)}


def test_a_record_round_trips() -> None:
    row = decode(encode(ROW))
    assert row is not None and row["caption"] == ROW["caption"]
    assert row["finished_at"] == "2026-01-01T00:00:00+00:00"


def test_a_torn_or_damaged_line_is_no_record() -> None:
    line = encode(ROW)
    assert decode(line[:-1]) is None            # torn: no line end
    assert decode(line[: len(line) // 2]) is None
    damaged = line.replace(b"kayak", b"kayaK")  # checksum no longer matches
    assert decode(damaged) is None
    assert decode(b"\n") is None


def test_recover_skips_a_torn_last_record(tmp_path: Path) -> None:
    j = Journal(tmp_path / "_journal", "run1")
    for i in range(3):
        j.append({**ROW, "id": f"r{i}"})
    j.close()
    (seg,) = segments(tmp_path / "_journal")
    with seg.open("ab") as f:
        f.write(encode({**ROW, "id": "torn"})[:25])  # the process died mid-write
    assert [r["id"] for r in recover(seg)] == ["r0", "r1", "r2"]


def test_rotate_starts_a_new_segment_and_discard_removes_the_old(tmp_path: Path) -> None:
    j = Journal(tmp_path / "_journal", "run1")
    j.append(ROW)
    first = j.rotate()
    j.append({**ROW, "id": "b"})
    assert first is not None and len(segments(tmp_path / "_journal")) == 2
    j.sync()
    Journal.discard(first)
    (left,) = segments(tmp_path / "_journal")
    assert [r["id"] for r in recover(left)] == ["b"]
    j.close()


def test_sync_from_another_thread_while_appending(tmp_path: Path) -> None:
    j = Journal(tmp_path / "_journal", "run1")
    stop = threading.Event()

    def syncer() -> None:
        while not stop.is_set():
            j.sync()

    t = threading.Thread(target=syncer)
    t.start()
    for i in range(2000):
        j.append({**ROW, "id": f"r{i}"})
        if i % 300 == 0:
            j.rotate()
    stop.set()
    t.join()
    j.close()
    ids = [r["id"] for s in segments(tmp_path / "_journal") for r in recover(s)]
    assert ids == [f"r{i}" for i in range(2000)]


def test_rows_added_but_never_flushed_are_recovered_into_a_part(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    schema = output_schema(["source"])
    sink = ParquetSink(out, schema, "killed", flush_rows=1000, flush_seconds=1e9)
    for i in range(5):
        sink.add({**ROW, "id": f"r{i}", "source": "cam", "image": f"{i}.png"})
    # the process dies here: no flush, no close
    assert recover_journal(out, schema, "next") == 5
    (part,) = out.glob("part-*.parquet")
    t = pq.read_table(part)
    assert sorted(t["id"].to_pylist()) == [f"r{i}" for i in range(5)]
    assert t["source"].to_pylist() == ["cam"] * 5
    assert segments(out / "_journal") == []


def test_recovered_rows_keep_columns_this_run_does_not_have(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    sink = ParquetSink(out, output_schema(["source"]), "killed", 1000, 1e9)
    sink.add({**ROW, "source": "cam"})
    recover_journal(out, output_schema([]), "next")
    (part,) = out.glob("part-*.parquet")
    assert pq.read_table(part)["source"].to_pylist() == ["cam"]
