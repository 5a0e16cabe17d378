"""``python -m pipeline report``: the static HTML gallery, checked in headless Chromium.

The page is opened as ``report.html#selftest``: its own JS clicks the error filter, types
in the search box and sorts by tokens, then writes what it saw into ``<pre id=selftest>``,
which ``chromium --dump-dom`` prints. No extra Python packages are needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from html import unescape
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.records import output_schema
from pipeline.report import main

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "sample"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]
ERROR_IDS = {"horse", "lost"}


@pytest.fixture(scope="module")
def chromium() -> str:
    """/usr/bin/chromium, installed from Debian once if missing; skip only if that fails."""
    if not os.path.exists(CHROMIUM):
        if not shutil.which("apt-get") or os.geteuid() != 0:
            pytest.skip("chromium missing and apt-get (as root) is not available")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run("apt-get update -qq && apt-get install -y -qq "
                           "--no-install-recommends chromium", shell=True, env=env,
                           timeout=300, capture_output=True, check=False)
        except subprocess.TimeoutExpired:
            pytest.skip("installing chromium with apt-get took longer than 300 s")
        if not os.path.exists(CHROMIUM):
            pytest.skip("chromium is missing and `apt-get install chromium` failed")
        print("chromium installed by the test fixture", file=sys.stderr)
    return CHROMIUM


def _row(id_: str, image: str, line: int, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {f: None for f in output_schema([]).names}
    row.update(id=id_, prompt_name="default", image=image, line=line, attempts=1,
               finished_at=datetime(2026, 1, 2, tzinfo=timezone.utc))
    row.update(kw)
    return row


def _ok(id_: str, image: str, line: int, tin: int, tout: int, caption: str) -> dict:
    return _row(id_, image, line, status="ok", caption=caption, captions=[caption],
                prompt_tokens=tin, completion_tokens=tout, total_tokens=tin + tout,
                latency_s=0.1 * line, ttft_s=0.05, width=64, height=64)


def _write(out: Path, name: str, rows: list[dict], cost: list[float | None] | None) -> None:
    schema = output_schema([])
    if cost is not None:
        if "cost_usd" not in schema.names:
            schema = schema.append(pa.field("cost_usd", pa.float64()))
        for r, c in zip(rows, cost):
            r["cost_usd"] = c
    else:
        schema = pa.schema([f for f in schema if f.name != "cost_usd"])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / name)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """OUT with two parts (one with cost_usd, one without), 5 ok and 2 error rows."""
    out = tmp_path / "OUT"
    (out / "_runs").mkdir(parents=True)
    img = lambda n: str(SAMPLES / n)  # noqa: E731 - absolute
    _write(out, "part-000001.parquet", [   # astronaut: relative to the manifest's folder
        _ok("astronaut", "astronaut.png", 1, 500, 40, "An astronaut in a white suit."),
        _ok("chelsea", img("chelsea.png"), 2, 300, 30, "A tabby cat <b>&</b> \"quotes\"."),
        _ok("rocket", img("rocket.jpg"), 3, 900, 50, "A rocket on the launch pad."),
    ], cost=[0.002, 0.001, 0.004])
    _write(out, "part-000002.parquet", [
        _ok("coffee", img("coffee.png"), 4, 120, 20, "<script>alert(1)</script> coffee"),
        _ok("remote", "https://example.invalid/x.jpg", 5, 200, 10, "A remote image."),
        _row("horse", img("horse.png"), 6, status="error", attempts=6,
             error="HTTP 429 after 6 attempts", error_class="rate_limit"),
        _row("lost", "no/such/file.png", 7, status="error", error="file not found",
             error_class="image"),
    ], cost=None)
    (out / "_runs" / "20260102T000000-abc.json").write_text(json.dumps(
        {"run_id": "20260102T000000-abc", "summary": "summary: ok=5 failed=2",
         "error_classes": {"rate_limit": 1, "image": 1}}))
    return out


def _browse(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_gallery_in_headless_chromium(dataset: Path, chromium: str, tmp_path: Path) -> None:
    page = tmp_path / "gallery.html"
    assert main([str(dataset), "--manifest", str(SAMPLES / "images.csv"),
                 "--out", str(page), "--thumb-size", "96"]) == 0
    html = page.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(?!data:|https://example\.invalid)', html)
    assert html.count('src="data:image/jpeg;base64,') == 5   # 4 ok files + horse
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert "rows <b>7</b>" in html and "error <b>2</b>" in html
    assert "cost <b>$0.0070</b>" in html and "20260102T000000-abc" in html

    done = _browse(chromium, tmp_path, "--dump-dom", page.as_uri() + "#selftest")
    dom = done.stdout
    assert "<tbody>" in dom, done.stderr[-2000:]
    for id_ in ("astronaut", "chelsea", "rocket", "coffee", "remote", "horse", "lost"):
        assert f'data-id="{id_}"' in dom
    found = re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    seen = json.loads(unescape(found.group(1)))
    assert seen["total"] == 7
    assert set(seen["errors"]) == ERROR_IDS and seen["shown"] == "2"
    assert seen["search"] == ["chelsea"]
    assert seen["tokens_desc"] == "rocket"       # 900 prompt tokens
    assert seen["tokens_asc"] == "coffee"        # 120; error rows (no tokens) sort last
    assert set(seen["all"][-2:]) == ERROR_IDS

    shot = tmp_path / "gallery.png"
    done = _browse(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,900",
                   page.as_uri())
    assert shot.exists(), done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    (REPO / "docs").mkdir(exist_ok=True)
    shutil.copy(shot, REPO / "docs" / "gallery.png")


def test_limit_truncates_and_default_path(dataset: Path, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([str(dataset), "--limit", "2"]) == 0
    html = (dataset / "report.html").read_text(encoding="utf-8")
    assert html.count("<tr data-id=") == 2 and "showing the first 2 of 7 rows" in html


def test_no_parts_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no part-*.parquet" in err
