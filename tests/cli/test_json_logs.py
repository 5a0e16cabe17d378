"""`--log-format json`: every line on stdout and stderr is one JSON object with a UTC
timestamp, a level and an event name, whatever way the run ends; the summary carries
the exit code, the stop reason and every count of the text summary."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import FAST, REPO, caption_cmd, subprocess_env, write_manifest
from fake_gateway import img
from test_jobs_and_operations import main_run, tiny_pngs, url_rows

from pipeline.commands.caption import build_parser, settings_from_args

JSON = ["--log-format", "json"]


def json_lines(*texts: str) -> list[dict[str, Any]]:
    """Every non-empty line of ``texts`` as JSON; fails on the first line that is not."""
    docs = []
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            doc = json.loads(line)
            assert isinstance(doc, dict), line
            assert {"ts", "level", "event"} <= set(doc), line
            ts = datetime.fromisoformat(doc["ts"].replace("Z", "+00:00"))
            assert doc["ts"].endswith("Z") and ts.utcoffset() == UTC.utcoffset(None)
            docs.append(doc)
    return docs


def events(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["event"] == name]


def test_a_budget_stop_is_json_lines_with_exit_5_and_every_count(gateway, tmp_path, capfd):
    tiny_pngs(tmp_path / "pics", 1)
    rows = url_rows(6) + [{"id": "r00", "image": img("ok", "dup.jpg")},   # a duplicate id
                          {"id": "p", "image": "pics/im0.png"},
                          {"id": "p-copy", "image": "pics/im0.png"}]       # copied
    rows = [rows[-2], rows[-1], *rows[:-2]]        # the copy is made before the budget
    manifest = write_manifest(tmp_path / "m.csv", rows)
    code, stdout, err = main_run(capfd, "caption", str(manifest), "--out", str(tmp_path / "o"),
                                 "--base-url", gateway.base_url, "--concurrency", "1",
                                 "--price-in", "1", "--price-out", "1", "--max-tokens", "10",
                                 "--max-cost", "0.0035", *FAST, *JSON)
    assert code == 5, err
    docs = json_lines(stdout, err)
    (stopped,) = events(docs, "stopped")
    assert stopped["level"] == "warning" and "budget" in stopped["message"]
    assert any("finishing the rows in flight" in d.get("message", "")
               for d in events(docs, "log"))                      # the runner's warning
    (summary,) = events(json_lines(stdout), "summary")
    assert (summary["exit_code"], summary["stop_reason"]) == (5, "max_cost")
    assert summary["copied_from_identical"] == 1
    for key in ("ok", "failed", "skipped_done", "skipped_duplicate", "tokens_in",
                "tokens_out", "cost_usd", "wall_s", "images_per_s", "error_classes", "out"):
        assert key in summary, key


def test_a_fatal_error_is_json_lines_with_exit_3(gateway, tmp_path, capfd):
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "1", "image": img("C35-401")}])
    code, stdout, err = main_run(capfd, "caption", str(manifest), "--out", str(tmp_path / "o"),
                                 "--base-url", gateway.base_url, *FAST, *JSON)
    assert code == 3, err
    docs = json_lines(stdout, err)
    (error,) = events(docs, "error")
    assert error["level"] == "error" and "401" in error["message"]
    (summary,) = events(docs, "summary")
    assert (summary["exit_code"], summary["stop_reason"]) == (3, "fatal")


def test_duplicate_id_warnings_are_json_lines(gateway, tmp_path, capfd):
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "a", "image": img("ok", "1.jpg")},
                                                   {"id": "a", "image": img("ok", "2.jpg")}])
    code, stdout, err = main_run(capfd, "caption", str(manifest), "--out", str(tmp_path / "o"),
                                 "--base-url", gateway.base_url, *FAST, *JSON)
    assert code == 0, err
    docs = json_lines(stdout, err)
    (warning,) = [d for d in docs if d["level"] == "warning"]
    assert "duplicate id 'a'" in warning["message"] and warning["logger"] == "pipeline"
    assert events(docs, "summary")[0]["skipped_duplicate"] == 1


@pytest.mark.parametrize("argv", [
    ["caption", "m.csv", "--concurency", "4"],           # argparse
    ["caption", "nope.csv", "--base-url", "http://127.0.0.1:9/v1"],  # the manifest
    ["captoin", "m.csv"],                                # the command
])
def test_usage_errors_are_one_json_line(capfd, argv):
    try:
        code, stdout, err = main_run(capfd, *argv, *JSON)
    except SystemExit as e:
        code, (stdout, err) = int(e.code or 0), capfd.readouterr()
    assert code == 2
    (doc,) = json_lines(stdout, err)
    assert doc["event"] == "error" and doc["exit_code"] == 2


def test_json_lines_turn_the_progress_bar_off(tmp_path):
    ns = build_parser().parse_args(["m.csv", "--base-url", "http://h/v1", *JSON])
    assert settings_from_args(ns).progress is False


@pytest.mark.slow
def test_a_sigint_is_json_lines_with_exit_130(gateway, tmp_path):
    rows = [{"id": f"s{i}", "image": img("slow", f"{i}.jpg", n=10, pace=0.05)}
            for i in range(6)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    cmd = caption_cmd(manifest, tmp_path / "o", gateway.base_url, "--concurrency", "2",
                      "--grace", "5", "--status-interval", "0.1", *JSON)
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while sum(c.outcome == "ok" for c in gateway.calls()) < 1:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    docs = json_lines(stdout, err)
    assert any("SIGINT" in d.get("message", "") for d in docs)   # the runner's warning
    assert events(docs, "progress")
    (summary,) = events(docs, "summary")
    assert (summary["exit_code"], summary["stop_reason"]) == (130, "sigint")
