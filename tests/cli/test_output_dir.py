"""OUT on real filesystems that fill up, refuse writes or hold files that are not parts.

A write that fails stops the run at once (exit 6, one line, a run report) and a rerun
on a fixed disk finishes every key exactly once; an unusable OUT is refused before the
first request (exit 2, one line); files in OUT that are not readable parts are moved
to ``_quarantine/``; OUT only ever holds data parts beside ``_``/``.`` names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from fake_gateway import Ctx, img

LONG = " ".join(["A long caption that fills the disk quickly."] * 30)


def long_rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"r{i:03d}", "image": img("LONG", f"{i}.jpg")} for i in range(n)]


def _long(gateway: Any) -> None:
    async def handler(ctx: Ctx) -> web.StreamResponse:
        return await ctx.ok(LONG)
    gateway.on("LONG", handler)


def kept_rows(out: Path) -> int:
    """Rows a rerun will not send again: in parts, or in the journal."""
    parts = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("part-*.parquet"))
    journal = sum(len(p.read_bytes().splitlines()) for p in (out / "_journal").glob("*"))
    return parts + journal


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_a_full_disk_stops_the_run_at_once_and_a_rerun_finishes(caption: Any, gateway: Any,
                                                                 small_disk: Any) -> None:
    disk = small_disk("4m")
    caption.out = disk.path / "out"
    _long(gateway)
    filler = disk.fill(leave=600_000)
    res = caption(long_rows(300), "--flush-rows", "10", concurrency=4)
    assert res.code == 6, res.stderr
    assert "Traceback" not in res.stderr
    (line,) = error_lines(res.stderr)
    assert "output cannot be written" in line and str(caption.out) in line
    assert "No space left on device" in line
    assert list((caption.out / "_runs").glob("*.json")), "a run report was written"
    kept, sent = kept_rows(caption.out), gateway.count()
    assert sent < 300
    assert sent <= kept + 4, f"{sent} requests for {kept} kept rows at concurrency 4"

    filler.unlink()
    again = caption(long_rows(300), "--flush-rows", "10", concurrency=4)
    assert again.code == 0, again.stderr
    assert sorted(again.ids) == [f"r{i:03d}" for i in range(300)]
    assert gateway.count() - sent == 300 - kept, "journaled rows are not sent again"


def test_a_full_disk_during_the_final_merge_is_only_a_warning(caption: Any, gateway: Any,
                                                               small_disk: Any,
                                                               monkeypatch: Any,
                                                               caplog: Any) -> None:
    import pipeline.store.dataset as dataset_mod

    disk = small_disk("4m")
    caption.out = disk.path / "out"
    real = dataset_mod.compact

    def compact_on_a_full_disk(out: Path, parts: list[Path], *args: Any) -> int:
        assert len(parts) >= 2, "nothing to merge: the test would prove nothing"
        disk.fill(leave=0, name="filler")  # the disk fills just as the merge begins
        return real(out, parts, *args)

    monkeypatch.setattr(dataset_mod, "compact", compact_on_a_full_disk)
    rows = [{"id": f"r{i}", "image": img("ok", f"{i}.jpg")} for i in range(12)]
    res = caption(rows, "--flush-rows", "1", concurrency=1)
    assert res.code == 0, res.stderr
    assert "Traceback" not in res.stderr and "not merged" in caplog.text
    assert sorted(res.ids) == sorted(f"r{i}" for i in range(12))
    assert not list(caption.out.glob(".*.tmp"))


@pytest.mark.parametrize("case", ["out-is-a-file", "read-only-out", "read-only-parent"])
def test_an_unwritable_out_exits_2_before_any_request(caption: Any, gateway: Any,
                                                      small_disk: Any, tmp_path: Path,
                                                      case: str) -> None:
    if case == "out-is-a-file":
        caption.out = tmp_path / "a-file"
        caption.out.write_text("not a directory")
    else:
        disk = small_disk("1m")
        (disk.path / "out").mkdir()
        import subprocess

        subprocess.run(["mount", "-o", "remount,ro", str(disk.path)], check=True)
        caption.out = disk.path / ("out" if case == "read-only-out" else "new/out")
    res = caption([{"id": "a", "image": img("ok", "a.jpg")}])
    assert res.code == 2, res.stderr
    (line,) = res.stderr_lines()
    assert line.startswith("error: --out ") and "Traceback" not in res.stderr
    assert gateway.count() == 0


def _good_part(out: Path) -> None:
    t = pq.read_table(next(out.glob("part-*.parquet")))
    return t


@pytest.mark.parametrize("bad", ["truncated", "garbage", "empty", "foreign", "int-ids"])
def test_an_unreadable_part_is_quarantined_and_its_rows_captioned_again(
        caption: Any, gateway: Any, bad: str, caplog: Any) -> None:
    rows = [{"id": f"r{i}", "image": img("ok", f"{i}.jpg")} for i in range(4)]
    assert caption(rows[:2]).code == 0
    out = caption.out
    part = next(out.glob("part-*.parquet"))
    data = part.read_bytes()
    victim = out / "part-zz-000001.parquet"
    if bad == "truncated":
        victim.write_bytes(data[: len(data) // 2])
        part.unlink()
    elif bad == "garbage":
        victim.write_bytes(b"this is not parquet at all" * 20)
    elif bad == "empty":
        victim.write_bytes(b"")
    elif bad == "foreign":
        pq.write_table(pa.table({"x": [1, 2]}), victim)
    else:
        pq.write_table(pa.table({"id": [1, 2], "prompt_name": ["d", "d"],
                                 "status": ["ok", "ok"]}), victim)
    res = caption(rows)
    assert res.code == 0, res.stderr
    warnings = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(warnings) == 1 and victim.name in warnings[0]
    assert (out / "_quarantine" / victim.name).exists() and not victim.exists()
    assert sorted(res.ids) == ["r0", "r1", "r2", "r3"]
    pd.read_parquet(out)  # readable again


def test_a_column_added_to_the_manifest_is_in_every_reader(caption: Any, gateway: Any) -> None:
    first = [{"id": f"a{i}", "image": img("ok", f"a{i}.jpg"), "source": "cam"}
             for i in range(2)]
    assert caption(first).code == 0
    second = [{**r, "license": ""} for r in first] + [
        {"id": "b0", "image": img("ok", "b0.jpg"), "source": "web", "license": "CC0"}]
    assert caption(second).code == 0
    df = pd.read_parquet(caption.out)
    assert {"source", "license"} <= set(df.columns)
    assert df.set_index("id").loc["b0", "license"] == "CC0"
    assert "license" in pads.dataset(caption.out).schema.names
    assert pads.dataset(caption.out).to_table().num_rows == 3


def test_out_holds_only_parts_beside_underscore_and_dot_names(caption: Any,
                                                              gateway: Any) -> None:
    assert caption([{"id": "a", "image": img("ok", "a.jpg")}]).code == 0
    names = {p.name for p in caption.out.iterdir()}
    assert all(n.startswith(("part-", "_", ".")) for n in names), names
    assert "_dataset.json" in names and "_runs" in names


# ---------------------------------------------------------------- what made OUT


def _two_rows() -> list[dict[str, str]]:
    return [{"id": "a", "image": img("ok", "a.jpg")}, {"id": "b", "image": img("ok", "b.jpg")}]


@pytest.mark.parametrize("change", [("--model", "another-model"),
                                    ("--prompt", "Name every object."),
                                    ("--system", "You are terse.")])
def test_resuming_with_other_settings_exits_2_naming_what_differs(caption: Any, gateway: Any,
                                                                  change: tuple[str, str]
                                                                  ) -> None:
    rows = _two_rows()
    assert caption(rows[:1]).code == 0
    sent = gateway.count()
    res = caption(rows, *change)
    assert res.code == 2 and gateway.count() == sent
    (line,) = res.stderr_lines()
    word = {"--model": "model", "--prompt": "prompt", "--system": "system"}[change[0]]
    assert f"made with {word}" in line and "--allow-mixed" in line and "new --out" in line


def test_with_allow_mixed_the_rows_are_told_apart(caption: Any, gateway: Any) -> None:
    rows = _two_rows()
    assert caption(rows[:1]).code == 0
    res = caption(rows, "--model", "another-model", "--prompt", "Name every object.",
                  "--allow-mixed")
    assert res.code == 0, res.stderr
    a, b = res.row("a"), res.row("b")
    assert a["prompt_sha256"] != b["prompt_sha256"]
    record = json.loads((caption.out / "_dataset.json").read_text())
    assert record["prompts"]["default"]["model"] == "another-model"
    assert record["history"][0]["model"] != "another-model"


def test_a_manifest_giving_known_ids_other_images_exits_2(caption: Any, gateway: Any) -> None:
    assert caption(_two_rows()).code == 0
    sent = gateway.count()
    other = [{"id": "a", "image": img("ok", "other-a.jpg")},
             {"id": "b", "image": img("ok", "other-b.jpg")}]
    res = caption(other)
    assert res.code == 2 and gateway.count() == sent
    (line,) = res.stderr_lines()
    assert "id 'a'" in line and "another image" in line and "--allow-mixed" in line
    assert caption(other, "--allow-mixed").code == 0


def test_every_row_records_the_hash_of_the_prompt_it_was_sent(caption: Any,
                                                              gateway: Any) -> None:
    import hashlib

    res = caption(_two_rows(), "--prompt", "Describe it.", "--system", "Be brief.")
    expected = hashlib.sha256(json.dumps(["Be brief.", "Describe it."]).encode()).hexdigest()
    assert res.row("a")["prompt_sha256"] == expected


def test_status_names_unreadable_and_quarantined_parts(caption: Any, gateway: Any) -> None:
    from pipeline.commands import status

    assert caption([{"id": "a", "image": img("ok", "a.jpg")}]).code == 0
    victim = caption.out / "part-zz-000001.parquet"
    victim.write_bytes(b"garbage")
    caption.capfd.readouterr()
    assert status.main([str(caption.out)]) == 0
    assert f"unreadable part {victim}" in caption.capfd.readouterr().out
    assert caption([{"id": "a", "image": img("ok", "a.jpg")}]).code == 0
    assert status.main([str(caption.out)]) == 0
    quarantined = caption.out / "_quarantine" / victim.name
    assert f"quarantined: {quarantined}" in caption.capfd.readouterr().out


def test_a_replaced_image_file_under_a_known_id_exits_2(caption: Any, gateway: Any,
                                                        tmp_path: Path) -> None:
    from conftest import SAMPLES

    photo = tmp_path / "photo.png"
    photo.write_bytes((SAMPLES / "chelsea.png").read_bytes())
    rows = [{"id": "a", "image": str(photo)}]
    assert caption(rows).code == 0
    photo.write_bytes((SAMPLES / "coffee.png").read_bytes())  # same path, other picture
    sent = gateway.count()
    res = caption(rows, "--named-prompt", "tags=List tags.")  # a pending row for id a
    assert res.code == 2 and gateway.count() == sent
    (line,) = res.stderr_lines()
    assert "id 'a'" in line and "other content" in line


def test_a_duplicate_id_line_with_another_image_is_skipped_not_a_conflict(
        caption: Any, gateway: Any) -> None:
    rows = _two_rows()
    assert caption(rows).code == 0
    dup = [*rows, {"id": "a", "image": img("ok", "elsewhere.jpg")}]  # a later duplicate
    res = caption(dup)
    assert res.code == 0, res.stderr
