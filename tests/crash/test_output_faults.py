"""Descriptors that run out, in a real subprocess.

* ``ulimit -n 64`` with ``--concurrency 200``: the run lowers its concurrency to what
  the limit allows (one warning line) and finishes, instead of failing every request.
* A leak elsewhere in the process takes every free descriptor mid-run: the next write
  to OUT fails, no new request starts after that moment, the run exits 6 with one line
  and a run report, and a rerun finishes each key exactly once.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, caption_cmd, read_out, subprocess_env, write_manifest
from fake_gateway import img

HERE = Path(__file__).parent


def _manifest(tmp_path: Path, rows_: int, **query: float) -> Path:
    rows = [{"id": f"r{i:03d}", "image": img("slow", f"{i}.jpg", **query)}
            for i in range(rows_)]
    return write_manifest(tmp_path / "m.csv", rows)


def _limit_fds(n: int):  # type: ignore[no-untyped-def]
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


@pytest.mark.slow
def test_a_low_descriptor_limit_lowers_the_concurrency_with_one_warning(gateway, tmp_path):
    manifest = _manifest(tmp_path, 40, n=3, pace=0.01)
    out = tmp_path / "out"
    cmd = caption_cmd(manifest, out, gateway.base_url, "--concurrency", "200")
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120, preexec_fn=_limit_fds(64))
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "open-file limit" in ln]
    assert len(warnings) == 1 and "--concurrency" in warnings[0]
    df = read_out(out)
    assert len(df) == 40 and (df["status"] == "ok").all()


@pytest.mark.slow
def test_descriptors_running_out_mid_run_stop_it_with_exit_6(gateway, tmp_path):
    manifest = _manifest(tmp_path, 120, n=6, pace=0.02)
    out, marks = tmp_path / "out", tmp_path / "marks.json"
    args = caption_cmd(manifest, out, gateway.base_url, "--concurrency", "8",
                       "--flush-rows", "3", "--grace", "10")[4:]  # after "-m pipeline caption"
    proc = subprocess.run([sys.executable, str(HERE / "fd_hoard.py"), str(marks), str(out),
                           *args], cwd=REPO, env=subprocess_env(HOARD_SECONDS="20"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 6, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "output cannot be written" in line and "Too many open files" in line
    assert list((out / "_runs").glob("*.json")), "a run report was written"
    m = json.loads(marks.read_text())
    failed_at = m["failed_at"]
    print(f"\nhoard at +0, write failed at +{failed_at - m['hoard_start']:.2f} s")
    late = [c for c in gateway.calls() if c.t > failed_at + 0.05]
    assert late == [], f"{len(late)} requests started after the failed write"
    sent = gateway.count()
    assert sent < 120

    rerun = subprocess.run(caption_cmd(manifest, out, gateway.base_url, "--concurrency", "8"),
                           cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    df = read_out(out)
    assert sorted(df["id"]) == [f"r{i:03d}" for i in range(120)]


@pytest.mark.slow
def test_out_removed_mid_run_stops_it_with_exit_6(gateway, tmp_path):
    import shutil
    import time

    manifest = _manifest(tmp_path, 80, n=6, pace=0.02)
    out = tmp_path / "out"
    cmd = caption_cmd(manifest, out, gateway.base_url, "--concurrency", "4",
                      "--flush-rows", "2")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any(out.glob("part-*.parquet")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        # Moved away in one step, then deleted: an rmtree of the live folder races the
        # run's own writes into it ("Directory not empty"); either way OUT is gone.
        gone = out.rename(tmp_path / "gone")
        shutil.rmtree(gone, ignore_errors=True)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 6, err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "output cannot be written" in line and str(out) in line
    assert gateway.count() < 80
