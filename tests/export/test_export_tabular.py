"""``jsonl`` and ``csv`` (read back with the json and csv modules), and what every
format exports: the best row per key of a real OUT, also after a killed run left
duplicates."""

from __future__ import annotations

import csv
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .helpers import REMOTE, Captioned, copy_out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_has_one_line_per_ok_key_with_typed_values(demo: Captioned, export,
                                                         tmp_path: Path) -> None:
    r = export(demo.out, "--to", tmp_path / "c.jsonl", "--format", "jsonl")
    assert r.code == 0, r.stderr
    lines = read_jsonl(tmp_path / "c.jsonl")
    ok = demo.ok()
    assert sorted(x["id"] for x in lines) == sorted(ok)
    for x in lines:
        row = ok[x["id"]]
        assert x["caption"] == row["caption"] and x["captions"] == row["captions"]
        assert x["prompt_tokens"] == row["prompt_tokens"]
        assert x["finished_at"] == row["finished_at"].isoformat()
    by_id = {x["id"]: x for x in lines}
    assert by_id["remote"]["image"] == REMOTE
    assert by_id["horse"]["image"] == str(demo.images / "horse.png")  # resolved, absolute
    assert "caption_json" not in by_id["horse"]  # null in every row: left out


def test_csv_reads_back_with_the_csv_module(named: Captioned, export, tmp_path: Path) -> None:
    r = export(named.out, "--to", tmp_path / "c.csv", "--format", "csv")
    assert r.code == 0, r.stderr
    with open(tmp_path / "c.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    want = {(x["id"], x["prompt_name"]): x for x in named.rows()}
    assert sorted((x["id"], x["prompt_name"]) for x in rows) == sorted(want)
    for x in rows:
        row = want[(x["id"], x["prompt_name"])]
        assert x["caption"] == row["caption"]
        assert json.loads(x["captions"]) == row["captions"]
        assert int(x["completion_tokens"]) == row["completion_tokens"]


def test_include_errors_adds_the_error_rows_with_their_reason(demo: Captioned, export,
                                                              tmp_path: Path) -> None:
    plain = export(demo.out, "--to", tmp_path / "a.jsonl", "--format", "jsonl")
    assert "1 keys whose best row is an error" in plain.stdout
    export(demo.out, "--to", tmp_path / "b.jsonl", "--format", "jsonl", "--include-errors")
    ghost = next(x for x in read_jsonl(tmp_path / "b.jsonl") if x["id"] == "ghost")
    assert ghost["status"] == "error" and ghost["caption"] is None
    assert ghost["error_class"] and "ghost.png" in ghost["error"]


def test_columns_chooses_and_orders_the_fields(demo: Captioned, export, tmp_path: Path) -> None:
    export(demo.out, "--to", tmp_path / "c.csv", "--format", "csv", "--columns",
           "caption,id,source")
    with open(tmp_path / "c.csv", newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["caption", "id", "source"]


def test_prompt_name_selects_one_prompt(named: Captioned, export, tmp_path: Path) -> None:
    export(named.out, "--to", tmp_path / "c.jsonl", "--format", "jsonl", "--prompt-name",
           "tags")
    assert {x["prompt_name"] for x in read_jsonl(tmp_path / "c.jsonl")} == {"tags"}


def _add_part(out: Path, name: str, rows: list[dict[str, Any]]) -> None:
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / name)


def test_a_killed_runs_duplicates_export_the_newest_ok_row_per_key(
        demo: Captioned, export, tmp_path: Path) -> None:
    out = copy_out(demo, tmp_path)
    ok = demo.ok()
    later = lambda r, s: r["finished_at"] + timedelta(seconds=s)  # noqa: E731
    _add_part(out, "part-zz-000001.parquet", [
        # a newer error beside the ok row: ok wins
        {**ok["camera"], "status": "error", "caption": None, "error": "boom",
         "finished_at": later(ok["camera"], 60)},
        # a newer ok row: it wins
        {**ok["horse"], "caption": "NEWER horse", "finished_at": later(ok["horse"], 60)},
        # an older ok row: the committed one wins
        {**ok["coffee"], "caption": "OLDER coffee", "finished_at": later(ok["coffee"], -60)},
    ])
    for errors in ([], ["--include-errors"]):
        dest = tmp_path / f"c{len(errors)}.jsonl"
        r = export(out, "--to", dest, "--format", "jsonl", *errors)
        assert r.code == 0, r.stderr
        assert "3 older duplicate rows of a key" in r.stdout
        got = read_jsonl(dest)
        ids = [x["id"] for x in got]
        assert len(ids) == len(set(ids))  # one line per key
        by_id = {x["id"]: x for x in got}
        assert by_id["camera"]["caption"] == ok["camera"]["caption"]
        assert by_id["horse"]["caption"] == "NEWER horse"
        assert by_id["coffee"]["caption"] == ok["coffee"]["caption"]


def test_files_starting_with_underscore_or_dot_are_not_data(demo: Captioned, export,
                                                            tmp_path: Path) -> None:
    out = copy_out(demo, tmp_path)
    (out / "_notes.parquet").write_bytes(b"not parquet")
    (out / ".part-x.parquet.1234.tmp").write_bytes(b"half a part")
    (out / "_quarantine").mkdir()
    (out / "_quarantine" / "part-bad.parquet").write_bytes(b"garbage")
    r = export(out, "--to", tmp_path / "c.jsonl", "--format", "jsonl")
    assert r.code == 0, r.stderr
    assert len(read_jsonl(tmp_path / "c.jsonl")) == len(demo.ok())


def test_without_dataset_json_relative_images_need_base_dir(demo: Captioned, export,
                                                            tmp_path: Path) -> None:
    out = copy_out(demo, tmp_path)
    (out / "_dataset.json").write_text("{not json", encoding="utf-8")
    r = export(out, "--to", tmp_path / "d", "--format", "sidecar")
    assert r.code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--base-dir" in r.stderr and "Traceback" not in r.stderr
    r = export(out, "--to", tmp_path / "d", "--format", "sidecar", "--base-dir", demo.images)
    assert r.code == 0 and (tmp_path / "d" / "horse.txt").is_file()
    # JSONL and CSV keep such paths as OUT holds them
    export(out, "--to", tmp_path / "c.jsonl", "--format", "jsonl")
    horse = next(x for x in read_jsonl(tmp_path / "c.jsonl") if x["id"] == "horse")
    assert horse["image"] == "horse.png"
