"""``python -m pipeline report``: the static HTML gallery, checked in headless Chromium.

The page is opened as ``_report.html#selftest?...``: its own JS reads the cards, clicks
the error filter, types a search, picks a manifest-column filter, sorts, and opens the
enlarged view of a photo and of a tiny image, then writes what it saw into
``<pre id=selftest>``, which ``chromium --dump-dom`` prints. Chromium comes from the
system (.ci/run installs Debian's package); without it the browser test skips.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import UTC, datetime
from html import unescape
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.commands.report import first_images, main, run_line
from pipeline.records import output_schema

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "sample"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]
ERROR_IDS = {"horse", "lost"}
RUN = {"run_id": "20260102T000000-abc", "started_at": "2026-01-02T00:00:00+00:00",
       "exit_code": 1, "note": None, "interrupted": None, "finished": 9, "total": 9, "ok": 7,
       "failed": 2, "skipped_done": 3, "tokens_in": 2900, "tokens_out": 200,
       "cost_usd": 0.007, "wall_s": 12.34, "error_classes": {"rate_limit": 1, "bad_image": 1}}


@pytest.fixture(scope="module")
def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (.ci/run installs Debian's chromium package)")
    return CHROMIUM


def _row(id_: str, prompt: str, image: str, line: int, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {f: None for f in output_schema(["split"]).names}
    row.update(id=id_, prompt_name=prompt, image=image, line=line, attempts=1,
               finished_at=datetime(2026, 1, 2, tzinfo=UTC))
    row.update(kw)
    return row


def _ok(id_: str, prompt: str, image: str, line: int, tin: int, caption: str,
        split: str) -> dict:
    return _row(id_, prompt, image, line, status="ok", caption=caption, captions=[caption],
                prompt_tokens=tin, completion_tokens=10, total_tokens=tin + 10,
                latency_s=0.1 * line, cost_usd=tin / 1e6, split=split)


def _write(out: Path, name: str, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema(["split"])), out / name)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """OUT with 7 images and 2 prompts, rows scattered over two parts in completion
    order; astronaut's path is relative (resolved from OUT/_dataset.json)."""
    out = tmp_path / "OUT"
    (out / "_runs").mkdir(parents=True)
    Image.new("RGB", (16, 12), (200, 30, 30)).save(tmp_path / "tiny.png")
    a = lambda n: str(SAMPLES / n)  # noqa: E731 - absolute
    _write(out, "part-000001.parquet", [
        _ok("rocket", "short", a("rocket.jpg"), 3, 900, "A rocket on the pad.", "train"),
        _ok("astronaut", "short", "astronaut.png", 1, 500, "An astronaut.", "train"),
        {**_ok("chelsea", "short", a("chelsea.png"), 2, 300, 'A cat <b>&</b> "quotes".',
               "val"), "quality_flags": ["too_long"], "quality_notes": "too_long: 70 words",
         "reasks": 1, "reask_flags": ["too_long"]},
        _row("horse", "short", a("horse.png"), 6, status="error", attempts=6,
             error="HTTP 429 after 6 attempts", error_class="rate_limit", split="val"),
        _ok("tiny", "short", str(tmp_path / "tiny.png"), 7, 50, "A red square.", "val"),
    ])
    _write(out, "part-000002.parquet", [
        _ok("coffee", "short", a("coffee.png"), 4, 120, "<script>alert(1)</script>", "train"),
        _ok("astronaut", "detailed", "astronaut.png", 1, 510, "An astronaut, posed.", "train"),
        _ok("remote", "short", "https://example.invalid/x.jpg", 5, 200, "Remote.", "train"),
        _row("lost", "short", "no/such/file.png", 8, status="error", error="file not found",
             error_class="bad_image", split="train"),
        {**_ok("rocket", "detailed", a("rocket.jpg"), 3, 950, "A Falcon 9 at dawn.", "train"),
         "quality_flags": [], "reasks": 1, "reask_flags": ["refusal"]},
    ])
    (out / "_runs" / f"{RUN['run_id']}.json").write_text(json.dumps(RUN))
    (out / "_dataset.json").write_text(json.dumps(
        {"manifest": {"path": str(SAMPLES / "images.csv"), "base_dir": str(SAMPLES)}}))
    return out


def _selftest(chromium: str, tmp: Path, page: Path, query: str) -> dict:
    done = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp / 'profile'}",
                           "--virtual-time-budget=10000", "--dump-dom",
                           f"{page.as_uri()}#selftest?{query}"],
                          capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r'<pre id="selftest">(.*?)</pre>', done.stdout, re.S)
    assert found, (done.stdout[-2000:], done.stderr[-2000:])
    return json.loads(unescape(found.group(1)))


def test_gallery_in_headless_chromium(dataset: Path, chromium: str, tmp_path: Path) -> None:
    page = tmp_path / "gallery.html"
    assert main([str(dataset), "--html", str(page), "--thumb-size", "96"]) == 0
    html = page.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(?!data:|https://example\.invalid)', html)
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html

    seen = _selftest(chromium, tmp_path, page,
                     "search=chelsea&col=split&val=val&qual=too_long")
    order = ["astronaut", "chelsea", "rocket", "coffee", "remote", "horse", "tiny", "lost"]
    assert seen["order"] == order                              # one card per image, in order
    assert set(seen["pictures"].values()) == {1}               # each picture once
    assert seen["prompts"]["astronaut"] == ["detailed", "short"]   # from two parts
    assert seen["prompts"]["rocket"] == ["detailed", "short"]
    assert set(seen["errors"]) == ERROR_IDS and seen["shown"] == "2"
    assert seen["search"] == ["chelsea"]
    assert seen["choices"] == ["train", "val"]
    assert seen["filtered"] == ["chelsea", "horse", "tiny"]    # split = val
    assert seen["by_tokens"][:2] == ["rocket", "astronaut"]    # 1870 and 1030 tokens
    assert seen["qualities"] == ["*", "too_long", "+reask"]    # the gate's flags, re-asks
    assert seen["quality"] == ["chelsea"]

    photo = seen["photo"]              # astronaut: its 512 px original behind a 96 px thumbnail
    assert photo["open"] and photo["src_is_full"] and photo["closed"]
    assert photo["natural"] == [512, 512] and photo["thumb"] == [96, 96]
    tiny = seen["tiny"]                                        # 16x12, scaled by whole factors
    assert tiny["px"] and tiny["natural"] == [16, 12] and tiny["thumb"] == [96, 72]
    k = tiny["shown"][0] // 16
    assert k >= 10 and tiny["shown"] == [16 * k, 12 * k]


def test_a_card_with_an_error_shows_the_error_only_on_that_prompt(dataset, tmp_path) -> None:
    page = tmp_path / "p.html"
    assert main([str(dataset), "--html", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    ok = re.search(r'<div class="prompt ok" data-prompt="short">.*?</div>', html).group(0)
    assert "ec" not in ok and "error" not in ok
    assert '<div class="prompt error" data-prompt="short"><span class="pn">short</span>' \
           '<p class="cap"><span class="ec">rate_limit</span>HTTP 429' in html


def test_the_run_line_reads_the_run_reports_own_keys() -> None:
    line = run_line(RUN)
    assert line == ("newest run <b>20260102T000000-abc</b> &middot; started 2026-01-02 "
                    "00:00:00 UTC &middot; exit 1 &middot; ok 7 &middot; failed 2 &middot; "
                    "already done 3 &middot; errors: bad_image 1, rate_limit 1 &middot; "
                    "cost $0.0070 &middot; 12.3 s")


def test_a_run_report_of_the_wrong_shape_does_not_break_the_line() -> None:
    line = run_line({"run_id": "r", "ok": "many", "error_classes": [1], "cost_usd": True,
                     "wall_s": None})
    assert line == "newest run <b>r</b>"


def test_an_unreadable_run_report_is_named(dataset, tmp_path) -> None:
    (dataset / "_runs" / "20990101T000000-zzz.json").write_text("{not json")
    assert main([str(dataset), "--html", str(tmp_path / "p.html")]) == 0
    assert "20990101T000000-zzz</b> &middot; (unreadable run report)" in \
        (tmp_path / "p.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- where images are


def _astronaut_found(page: Path) -> bool:
    card = re.search(r'<article class="card" data-id="astronaut".*?</article>',
                     page.read_text(encoding="utf-8"), re.S).group(0)
    return "data:image/jpeg;base64," in card


def test_relative_paths_resolve_from_the_datasets_record_not_the_cwd(dataset, tmp_path,
                                                                     monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)                     # no astronaut.png here
    assert main([str(dataset), "--html", str(tmp_path / "p.html")]) == 0
    assert _astronaut_found(tmp_path / "p.html")


def test_manifest_option_wins_over_the_record(dataset, tmp_path, monkeypatch) -> None:
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "m.csv").write_text("id,image\n")
    assert main([str(dataset), "--manifest", str(elsewhere / "m.csv"),
                 "--html", str(tmp_path / "p.html")]) == 0
    assert not _astronaut_found(tmp_path / "p.html")


@pytest.mark.parametrize("record", [None, "{not json", '{"manifest": "x"}',
                                    '{"manifest": {"base_dir": "relative/dir"}}', "[]"])
def test_an_absent_or_malformed_record_falls_back_to_the_current_folder(
        dataset, tmp_path, monkeypatch, capsys, record) -> None:
    (dataset / "_dataset.json").unlink()
    if record is not None:
        (dataset / "_dataset.json").write_text(record)
    monkeypatch.chdir(SAMPLES)                      # astronaut.png is here
    assert main([str(dataset), "--html", str(tmp_path / "p.html")]) == 0
    assert _astronaut_found(tmp_path / "p.html")
    err = capsys.readouterr().err
    assert err.count("\n") == (0 if record is None else 1), err


# --------------------------------------------------------------------------- output


def test_the_page_lands_where_parquet_readers_do_not_look(dataset, tmp_path) -> None:
    assert main([str(dataset)]) == 0
    assert (dataset / "_report.html").is_file()
    assert len(pd.read_parquet(dataset)) == 10
    assert ds.dataset(str(dataset), format="parquet").count_rows() == 10


def test_limit_keeps_the_first_images_in_manifest_order(dataset, tmp_path) -> None:
    page = tmp_path / "p.html"
    assert main([str(dataset), "--limit", "2", "--html", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    assert re.findall(r'<article class="card" data-id="(\w+)"', html) == ["astronaut", "chelsea"]
    assert "Showing the first 2 of 8 images" in html


def test_first_images_holds_at_most_twice_the_limit(tmp_path) -> None:
    import random

    ids = [f"r{i:05d}" for i in range(5000)]
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    table = pa.table({"id": shuffled * 2, "line": [int(i[1:]) for i in shuffled] * 2})
    pq.write_table(table, tmp_path / "part-1.parquet", row_group_size=300)
    got = first_images(ds.dataset(str(tmp_path / "part-1.parquet")), 7)
    assert got == ids[:7]


def test_no_parts_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no part-*.parquet" in err


def test_an_unwritable_page_is_exit_2_with_one_line(dataset, tmp_path, capsys) -> None:
    assert main([str(dataset), "--html", str(tmp_path / "no" / "such" / "p.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "--html" in err
