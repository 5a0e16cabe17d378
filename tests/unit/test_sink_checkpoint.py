"""Specification of pipeline/sink.py and pipeline/checkpoint.py: the output directory.

OUT holds committed ``part-*.parquet`` files only; anything in flight has a dot-name.
``Checkpoint.load`` cleans leftovers, repairs duplicate keys (ok over error, newer over
older) and indexes the keys that count as done. Rows are built with pipeline.records,
exactly as the worker builds them.
"""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.store.sink as sink_mod
from pipeline.records import (
    Completion,
    ManifestRow,
    Usage,
    error_row,
    ok_row,
    output_schema,
)
from pipeline.store.checkpoint import Checkpoint, KeySet, key_hash
from pipeline.store.sink import ParquetSink, commit_table, compact, part_files

SCHEMA = output_schema(["source"])
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def mrow(rid: str, prompt_name: str = "default", line: int = 2) -> ManifestRow:
    return ManifestRow(rid, f"{rid}.png", None, line, {"source": "cam"}, prompt_name=prompt_name)


def ok(rid: str, caption: str = "A horse.", at: datetime = T0, **kw: Any) -> dict[str, Any]:
    c = Completion(caption, "stop", "stop", "m", "chatcmpl-1", Usage(10, 3, 13, 0), "done", {})
    return ok_row(mrow(rid, **kw), c, attempts=1, finished_at=at).to_record()


def err(rid: str, at: datetime = T0, **kw: Any) -> dict[str, Any]:
    return error_row(mrow(rid, **kw), "HTTP 500: boom", "server", attempts=3,
                     finished_at=at).to_record()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def new_sink(out: Path, flush_rows: int = 100, flush_seconds: float = 10.0,
             clock: FakeClock | None = None, run_id: str = "r1",
             schema: pa.Schema = SCHEMA) -> ParquetSink:
    out.mkdir(parents=True, exist_ok=True)
    return ParquetSink(out, schema, run_id, flush_rows, flush_seconds,
                       clock=clock or FakeClock())


def write_part(out: Path, rows: list[dict[str, Any]], name: str,
               schema: pa.Schema = SCHEMA) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    final = out / name
    commit_table(pa.Table.from_pylist(rows, schema=schema), final)
    return final


def all_rows(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in part_files(out)], ignore_index=True)


# --------------------------------------------------------------------------- atomic parts


def test_part_is_written_under_a_dot_name_then_renamed(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    sink = new_sink(out)
    seen: list[tuple[str, str, list[str]]] = []
    real_replace = os.replace

    def spy_replace(src: Any, dst: Any) -> None:
        visible = sorted(p.name for p in out.glob("*.parquet"))
        seen.append((Path(src).name, Path(dst).name, visible))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    final = sink.write([ok("a"), ok("b")])
    assert final is not None
    ((src, dst, visible_before),) = seen
    assert src.startswith(".") and src.endswith(".tmp")
    assert dst == final.name
    assert visible_before == []  # nothing matched OUT/*.parquet until the rename


def test_no_visible_parquet_is_ever_half_written(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    sink = new_sink(out)
    real_write = pq.write_table
    checks: list[list[str]] = []

    def spy_write(table: pa.Table, where: Any, *a: Any, **kw: Any) -> None:
        assert Path(where).name.startswith(".")
        real_write(table, where, *a, **kw)
        # Mid-commit, every file a reader could pick up must be complete.
        for p in out.glob("*.parquet"):
            pq.read_table(p)
        checks.append(sorted(p.name for p in out.glob("*.parquet")))

    monkeypatch.setattr(sink_mod.pq, "write_table", spy_write)
    for i in range(3):
        sink.write([ok(f"r{i}")])
    assert checks == [[], ["part-r1-000001.parquet"],
                      ["part-r1-000001.parquet", "part-r1-000002.parquet"]]


def test_commit_leaves_no_temporary_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    new_sink(out).write([ok("a")])
    assert [p.name for p in out.iterdir()] == ["part-r1-000001.parquet"]


def test_failed_commit_leaves_no_visible_part(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    sink = new_sink(out)

    def crash(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        sink.write([ok("a")])
    assert list(out.glob("*.parquet")) == []
    assert part_files(out) == []


def test_parts_are_numbered_in_commit_order(tmp_path: Path) -> None:
    sink = new_sink(tmp_path / "out", run_id="20260101T000000-abc123")
    names = [sink.write([ok(f"r{i}")]).name for i in range(3)]  # type: ignore[union-attr]
    assert names == [f"part-20260101T000000-abc123-{i:06d}.parquet" for i in (1, 2, 3)]
    assert [p.name for p in part_files(tmp_path / "out")] == names


def test_write_counts_rows_and_records_parts(tmp_path: Path) -> None:
    sink = new_sink(tmp_path / "out")
    p1 = sink.write([ok("a"), err("b")])
    p2 = sink.write([ok("c")])
    assert sink.rows_written == 3
    assert sink.parts == [p1, p2]


def test_write_of_no_rows_commits_nothing(tmp_path: Path) -> None:
    sink = new_sink(tmp_path / "out")
    assert sink.write([]) is None
    assert part_files(tmp_path / "out") == [] and sink.rows_written == 0


def test_part_round_trips_ok_and_error_rows_with_the_output_schema(tmp_path: Path) -> None:
    sink = new_sink(tmp_path / "out")
    part = sink.write([ok("a", caption="A bay horse."), err("b")])
    t = pq.read_table(part)
    assert t.schema.equals(SCHEMA)
    got = {r["id"]: r for r in t.to_pylist()}
    assert got["a"]["caption"] == "A bay horse." and got["a"]["status"] == "ok"
    assert got["a"]["total_tokens"] == 13 and got["a"]["source"] == "cam"
    assert got["b"]["status"] == "error" and got["b"]["error_class"] == "server"
    assert got["b"]["caption"] is None


# --------------------------------------------------------------------------- due


def test_empty_sink_is_never_due(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = new_sink(tmp_path / "out", flush_rows=1, flush_seconds=1.0, clock=clock)
    clock.now += 1000
    assert sink.due is False


def test_due_when_buffer_reaches_flush_rows(tmp_path: Path) -> None:
    sink = new_sink(tmp_path / "out", flush_rows=3, flush_seconds=1e9)
    sink.add(ok("a"))
    sink.add(ok("b"))
    assert sink.due is False
    sink.add(ok("c"))
    assert sink.due is True


def test_due_when_flush_seconds_elapse_on_the_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = new_sink(tmp_path / "out", flush_rows=1000, flush_seconds=10.0, clock=clock)
    sink.add(ok("a"))
    clock.now += 9.99
    assert sink.due is False
    clock.now += 0.01
    assert sink.due is True


def test_take_empties_the_buffer_and_restarts_the_timer(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = new_sink(tmp_path / "out", flush_rows=1000, flush_seconds=10.0, clock=clock)
    sink.add(ok("a"))
    clock.now += 15
    batch = sink.take()
    assert [r["id"] for r in batch.rows] == ["a"]
    sink.add(ok("b"))
    assert sink.due is False
    assert sink.seconds_until_due() == 10.0
    clock.now += 4
    assert sink.seconds_until_due() == 6.0


def test_seconds_until_due_never_negative(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = new_sink(tmp_path / "out", flush_seconds=5.0, clock=clock)
    clock.now += 60
    assert sink.seconds_until_due() == 0.0


# --------------------------------------------------------------------------- compact


def test_compact_merges_small_parts_and_keeps_every_row(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = new_sink(out)
    for i in range(5):
        sink.write([ok(f"r{i}a"), err(f"r{i}b")])
    before = all_rows(out).sort_values("id").reset_index(drop=True)
    removed = compact(out, sink.parts, "r1", SCHEMA)
    assert removed == 5
    parts = part_files(out)
    assert [p.name for p in parts] == ["part-r1-m001.parquet"]
    after = all_rows(out).sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_compact_leaves_a_single_part_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = new_sink(out)
    sink.write([ok("a")])
    assert compact(out, sink.parts, "r1", SCHEMA) == 0
    assert part_files(out) == sink.parts


def test_compact_keeps_large_parts_as_they_are(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink_mod, "_COMPACT_BELOW", 3)
    out = tmp_path / "out"
    sink = new_sink(out)
    big = sink.write([ok("a"), ok("b"), ok("c")])
    sink.write([ok("d")])
    sink.write([ok("e")])
    assert compact(out, sink.parts, "r1", SCHEMA) == 2
    assert big in part_files(out)
    assert sorted(all_rows(out)["id"]) == ["a", "b", "c", "d", "e"]


def test_compact_bounds_merged_part_size(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink_mod, "_MERGED_MAX_ROWS", 4)
    out = tmp_path / "out"
    sink = new_sink(out)
    for i in range(6):
        sink.write([ok(f"{i}x"), ok(f"{i}y")])
    compact(out, sink.parts, "r1", SCHEMA)
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in part_files(out)]
    assert sizes == [4, 4, 4]


def test_compact_merges_parts_of_different_schemas_into_their_union(tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = output_schema(["source", "license"])
    a = new_sink(out, run_id="r1")
    a.write([ok("a")])
    a.write([ok("b")])
    b = new_sink(out, run_id="r2", schema=other)
    b.write([{**ok("c"), "license": "CC0"}])
    compact(out, a.parts + b.parts, "r1", other)
    (merged,) = part_files(out)
    assert pq.ParquetFile(merged).schema_arrow.equals(other)
    rows = {r["id"]: r["license"] for r in pq.read_table(merged).to_pylist()}
    assert rows == {"a": None, "b": None, "c": "CC0"}


def test_compact_skips_parts_that_no_longer_exist(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = new_sink(out)
    sink.write([ok("a")])
    assert compact(out, [out / "part-gone-000001.parquet", *sink.parts], "r1", SCHEMA) == 0


# --------------------------------------------------------------------------- checkpoint


def test_load_of_a_missing_output_dir_is_empty(tmp_path: Path) -> None:
    state = Checkpoint(tmp_path / "nothing").load(retry_errors=False)
    assert len(state.done) == 0 and state.parts == [] and state.rows_ok == 0


def test_load_removes_leftover_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    new_sink(out).write([ok("a")])
    (out / ".part-r0-000001.parquet.1a2b3c4d.tmp").write_bytes(b"PAR1 half")
    (out / ".part-r0-m001.parquet.deadbeef.tmp").write_bytes(b"")
    state = Checkpoint(out).load(retry_errors=False)
    assert state.temp_files_removed == 2
    assert not list(out.glob(".*.tmp"))


def test_load_keeps_lock_runs_and_parts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    part = new_sink(out).write([ok("a")])
    (out / ".lock").write_text("1234")
    (out / "_runs").mkdir()
    (out / "_runs" / "r1.json").write_text("{}")
    Checkpoint(out).load(retry_errors=False)
    assert (out / ".lock").exists() and (out / "_runs" / "r1.json").exists()
    assert part is not None and part.exists()


def test_a_failed_commit_removes_its_temporary_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    sink = new_sink(out)
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("crash")))
        with pytest.raises(OSError):
            sink.write([ok("a")])
    assert list(out.iterdir()) == []  # the space a full disk needs is given back at once


def test_load_indexes_ok_and_permanent_error_keys_as_done(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = new_sink(out)
    bad = error_row(mrow("b"), "HTTP 400: no", "bad_request", attempts=1,
                    finished_at=T0).to_record()
    sink.write([ok("a"), bad])
    sink.write([ok("c")])
    state = Checkpoint(out).load(retry_errors=False)
    assert all(key_hash(r, "default") in state.done for r in ("a", "b", "c"))
    assert key_hash("d", "default") not in state.done
    assert (state.rows_ok, state.rows_error, state.rows_retried) == (2, 1, 0)
    assert state.parts == part_files(out)


@pytest.mark.parametrize("cls", ["rate_limit", "server", "overloaded", "timeout",
                                 "connection", "stream_broken", "stream_error"])
def test_transient_error_rows_are_pending_again_by_default(tmp_path: Path, cls: str) -> None:
    out = tmp_path / "out"
    flaky = error_row(mrow("b"), "flaky", cls, finished_at=T0).to_record()
    new_sink(out).write([ok("a"), flaky])
    state = Checkpoint(out).load(retry_errors=False)
    assert key_hash("a", "default") in state.done
    assert key_hash("b", "default") not in state.done
    assert (state.rows_error, state.rows_retried) == (1, 1)


def test_load_with_retry_errors_counts_only_ok_rows_as_done(tmp_path: Path) -> None:
    out = tmp_path / "out"
    new_sink(out).write([ok("a"), err("b")])
    state = Checkpoint(out).load(retry_errors=True)
    assert key_hash("a", "default") in state.done
    assert key_hash("b", "default") not in state.done
    assert (state.rows_ok, state.rows_error) == (1, 1)


def test_done_keys_include_the_prompt_name(tmp_path: Path) -> None:
    out = tmp_path / "out"
    new_sink(out).write([ok("a", prompt_name="short")])
    state = Checkpoint(out).load(retry_errors=False)
    assert key_hash("a", "short") in state.done
    assert key_hash("a", "default") not in state.done


def _statuses(out: Path) -> dict[str, list[tuple[str, Any]]]:
    got: dict[str, list[tuple[str, Any]]] = {}
    for r in all_rows(out).to_dict("records"):
        text = r["caption"] if r["status"] == "ok" else r["error"]
        got.setdefault(r["id"], []).append((r["status"], text))
    return got


def test_repair_keeps_ok_over_a_newer_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_part(out, [ok("a", caption="good", at=T0)], "part-r1-000001.parquet")
    write_part(out, [err("a", at=T0 + timedelta(hours=1))], "part-r2-000001.parquet")
    state = Checkpoint(out).load(retry_errors=True)
    assert state.duplicates_removed == 1
    assert _statuses(out) == {"a": [("ok", "good")]}
    assert key_hash("a", "default") in state.done


def test_repair_keeps_ok_from_a_later_part_over_an_earlier_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_part(out, [err("a", at=T0), ok("b")], "part-r1-000001.parquet")
    write_part(out, [ok("a", caption="retried", at=T0 + timedelta(hours=1))],
               "part-r2-000001.parquet")
    state = Checkpoint(out).load(retry_errors=False)
    assert state.duplicates_removed == 1
    assert _statuses(out) == {"a": [("ok", "retried")], "b": [("ok", "A horse.")]}
    assert (state.rows_ok, state.rows_error) == (2, 0)


def test_repair_keeps_the_newer_of_two_ok_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_part(out, [ok("a", caption="newer", at=T0 + timedelta(minutes=5))],
               "part-r1-000001.parquet")
    write_part(out, [ok("a", caption="older", at=T0)], "part-r2-000001.parquet")
    Checkpoint(out).load(retry_errors=False)
    assert _statuses(out) == {"a": [("ok", "newer")]}


def test_repair_keeps_the_newer_of_two_error_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = error_row(mrow("a"), "old failure", "server", finished_at=T0).to_record()
    new = error_row(mrow("a"), "new failure", "server",
                    finished_at=T0 + timedelta(seconds=1)).to_record()
    write_part(out, [new], "part-r1-000001.parquet")
    write_part(out, [old], "part-r2-000001.parquet")
    Checkpoint(out).load(retry_errors=False)
    assert _statuses(out) == {"a": [("error", "new failure")]}


def test_repair_of_an_interrupted_merge_keeps_one_copy_of_each_row(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = [ok(f"r{i}") for i in range(4)]
    write_part(out, rows[:2], "part-r1-000001.parquet")
    write_part(out, rows[2:], "part-r1-000002.parquet")
    write_part(out, rows, "part-r1-m001.parquet")  # merged, originals not yet removed
    state = Checkpoint(out).load(retry_errors=False)
    assert state.duplicates_removed == 4
    assert sorted(all_rows(out)["id"]) == ["r0", "r1", "r2", "r3"]
    assert len(state.parts) == len(part_files(out))


def test_repair_removes_a_part_whose_rows_all_lost(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_part(out, [err("a"), err("b")], "part-r1-000001.parquet")
    write_part(out, [ok("a"), ok("b"), ok("c")], "part-r2-000001.parquet")
    Checkpoint(out).load(retry_errors=False)
    assert [p.name for p in part_files(out)] == ["part-r2-000001.parquet"]


def test_repair_handles_duplicates_inside_one_part(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_part(out, [err("a"), ok("a", caption="won"), ok("b")], "part-r1-000001.parquet")
    state = Checkpoint(out).load(retry_errors=False)
    assert state.duplicates_removed == 1
    assert _statuses(out) == {"a": [("ok", "won")], "b": [("ok", "A horse.")]}


def test_same_id_with_other_prompt_name_is_not_a_duplicate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_part(out, [ok("a"), ok("a", prompt_name="short")], "part-r1-000001.parquet")
    state = Checkpoint(out).load(retry_errors=False)
    assert state.duplicates_removed == 0 and state.rows_ok == 2


def test_second_load_after_repair_finds_nothing_to_repair(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_part(out, [err("a")], "part-r1-000001.parquet")
    write_part(out, [ok("a")], "part-r2-000001.parquet")
    Checkpoint(out).load(retry_errors=False)
    again = Checkpoint(out).load(retry_errors=False)
    assert again.duplicates_removed == 0 and again.temp_files_removed == 0
    assert again.rows_ok == 1


# --------------------------------------------------------------------------- KeySet


def test_keyset_membership_beyond_the_merge_threshold() -> None:
    rng = random.Random(7)
    n = KeySet._MERGE_AT + 4_464
    members = [rng.getrandbits(64) - (1 << 63) for _ in range(n)]
    ks = KeySet()
    for h in members:
        ks.add(h)
    assert len(ks._sorted) >= KeySet._MERGE_AT  # the merge path ran
    assert len(ks) == len(set(members))
    assert all(h in ks for h in members)
    others = [rng.getrandbits(64) - (1 << 63) for _ in range(5_000)]
    assert not any(h in ks for h in set(others) - set(members))


def test_keyset_adding_a_member_twice_counts_once() -> None:
    ks = KeySet()
    ks.add(5)
    ks.add(5)
    ks.add_many(np.array([5, 6], dtype=np.int64))
    ks.add(6)
    assert len(ks) == 2 and 5 in ks and 6 in ks and 7 not in ks


def test_keyset_extreme_int64_values() -> None:
    ks = KeySet()
    lo, hi = -(1 << 63), (1 << 63) - 1
    ks.add(lo)                                   # recent set
    ks.add_many(np.array([hi], dtype=np.int64))  # sorted array (merges the recent set)
    assert lo in ks and hi in ks and 0 not in ks and len(ks) == 2


def test_checkpoint_index_of_more_keys_than_the_merge_threshold(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    n = KeySet._MERGE_AT + 4_464
    ids = [f"img-{i:06d}" for i in range(n)]
    table = pa.table({name: pa.nulls(n, f.type) for name, f in zip(SCHEMA.names, SCHEMA)},
                     schema=SCHEMA)
    for col, values in (("id", ids), ("prompt_name", ["default"] * n), ("status", ["ok"] * n)):
        table = table.set_column(SCHEMA.get_field_index(col), col, pa.array(values))
    commit_table(table, out / "part-r1-000001.parquet")
    state = Checkpoint(out).load(retry_errors=True)
    assert state.rows_ok == n and len(state.done) == n
    assert all(key_hash(i, "default") in state.done for i in ids)
    assert key_hash(f"img-{n:06d}", "default") not in state.done


# --------------------------------------------------------------------------- readers


def test_pandas_reads_out_dir_with_runs_lock_and_leftovers_beside_parts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = new_sink(out)
    sink.write([ok("a"), err("b")])
    sink.write([ok("c")])
    (out / ".lock").write_text("4242")
    (out / "_runs").mkdir()
    (out / "_runs" / "r1.json").write_text('{"run_id": "r1"}')
    (out / ".part-r1-000003.parquet.0badf00d.tmp").write_bytes(b"PAR1 partial")
    df = pd.read_parquet(out)
    assert sorted(df["id"]) == ["a", "b", "c"]
    assert list(df.columns) == SCHEMA.names
