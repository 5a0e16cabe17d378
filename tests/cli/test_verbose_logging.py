"""What -v and -vv show: one debug line per retry (row id, error class, attempt, delay)
and per failed row; the libraries' own debug lines only with -vv."""

from __future__ import annotations

import logging
import subprocess

import pytest
from conftest import REPO, SAMPLES, caption_cmd, subprocess_env, write_manifest
from fake_gateway import img


@pytest.fixture(autouse=True)
def _restore_pipeline_level() -> None:
    logger = logging.getLogger("pipeline")
    level = logger.level
    yield
    logger.setLevel(level)


def test_v_logs_one_line_per_retry_and_one_per_failed_row(caption, caplog):
    res = caption([{"id": "r1", "image": img("s500")}], "-v", retries=2)
    assert res.code == 1, res.stderr
    lines = [r.getMessage() for r in caplog.records
             if r.name.startswith("pipeline") and r.levelno == logging.DEBUG
             and r.getMessage().startswith("row r1")]
    retries = [ln for ln in lines if "retrying in" in ln]
    failures = [ln for ln in lines if "failed after" in ln]
    assert [ln.split(" failed")[0] for ln in retries] == ["row r1: attempt 1", "row r1: attempt 2"]
    assert all("(server: HTTP 500" in ln and ln.endswith(" s") for ln in retries)
    assert failures == [lines[-1]] and "failed after 3 attempt(s) (server)" in failures[0]


def test_without_v_there_are_no_debug_lines(caption, caplog):
    caption([{"id": "r1", "image": img("s500")}], retries=1)
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG
                and r.name.startswith("pipeline")]


@pytest.mark.parametrize("flag, pillow_lines", [("-v", False), ("-vv", True)])
def test_library_debug_lines_only_with_vv(gateway, tmp_path, flag, pillow_lines):
    image = tmp_path / "horse.png"
    image.write_bytes((SAMPLES / "horse.png").read_bytes())
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "h", "image": "horse.png"}])
    proc = subprocess.run(caption_cmd(manifest, tmp_path / "out", gateway.base_url,
                                      "--max-edge", "64", flag),
                          cwd=REPO, env=subprocess_env(), capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert ("DEBUG STREAM b'IHDR'" in err) is pillow_lines  # PIL.PngImagePlugin's chatter
