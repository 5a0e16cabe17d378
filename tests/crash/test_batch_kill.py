"""SIGKILL the batch lane at each step; the rerun submits nothing twice (the simulator
counts every upload and create) and the dataset has exactly one row per key.

The CLI runs as a real subprocess; the simulator (in this process) holds its answer at
the step under test, so the kill falls exactly there: after the request file is built
(upload not stored), after the upload (stored, answer not received), after the create
(created, answer not received), and during collection (results streaming).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from batchlane.helpers import Sim, batch_argv, images_manifest, one_row_per_key
from conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow
ROWS = 120
KILL_WITHIN_S = 30.0


def _states(out: Path) -> list[str]:
    found = []
    for p in (out / "_batches").glob("cp*.json"):
        try:
            found.append(json.loads(p.read_text())["state"])
        except (OSError, ValueError):
            continue  # being replaced this instant
    return found


def _journaled(out: Path) -> bool:
    return any(p.stat().st_size > 0 for p in (out / "_journal").glob("*")) \
        if (out / "_journal").is_dir() else False


def _run_and_kill(argv: list[str], when: Callable[[], bool], log: Path) -> None:
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=REPO,
                                env=subprocess_env(), stdout=sink, stderr=sink)
        try:
            deadline = time.monotonic() + KILL_WITHIN_S
            while not when():
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "the step under test never came"
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _rerun(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", *argv, "--wait"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture
def setup(tmp_path: Path):
    sims: list[Sim] = []

    def make(api: str = "openai", **batch: float) -> tuple[Sim, list[str], Path]:
        sims.append(Sim(**batch))
        out = tmp_path / "out"
        argv = batch_argv(images_manifest(tmp_path, ROWS), out, sims[-1].base_url, "--api",
                          api)
        return sims[-1], argv, out

    yield make
    for s in sims:
        s.stop()


def _assert_complete(out: Path) -> None:
    df = one_row_per_key(out)
    assert len(df) == ROWS and (df["status"] == "ok").all()
    assert df["batch_id"].nunique() == 1


def test_killed_after_building_the_file_the_rerun_uploads_and_creates_once(setup, tmp_path):
    sim, argv, out = setup(upload_hold=30)
    _run_and_kill(argv, lambda: "built" in _states(out) and sim.state.calls["upload"] >= 1,
                  tmp_path / "run1.log")
    assert sim.state.uploads == 0 and sim.creates == 0
    sim.configure(upload_hold=0)
    _rerun(argv)
    assert sim.state.uploads == 1 and sim.creates == 1
    _assert_complete(out)


def test_killed_after_the_upload_the_rerun_finds_the_file_and_creates_once(setup, tmp_path):
    sim, argv, out = setup(upload_delay=30)
    _run_and_kill(argv, lambda: sim.state.uploads == 1, tmp_path / "run1.log")
    assert _states(out) == ["built"]  # the answer (the file id) never arrived
    sim.configure(upload_delay=0)
    _rerun(argv)
    assert sim.state.uploads == 1 and sim.creates == 1
    _assert_complete(out)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_killed_after_the_create_the_rerun_adopts_the_batch(setup, tmp_path, api):
    sim, argv, out = setup(api, create_delay=30)
    _run_and_kill(argv, lambda: sim.creates == 1, tmp_path / "run1.log")
    assert _states(out) == ["creating"]  # the answer (the batch id) never arrived
    sim.configure(create_delay=0)
    _rerun(argv)
    assert sim.creates == 1
    _assert_complete(out)


def test_killed_during_collection_the_rerun_keeps_one_row_per_key(setup, tmp_path):
    sim, argv, out = setup(line_delay=0.02)
    _run_and_kill([*argv, "--wait", "--flush-rows", "10"], lambda: _journaled(out),
                  tmp_path / "run1.log")
    assert _states(out) == ["ended"]
    sim.configure(line_delay=0)
    _rerun(argv)
    assert sim.creates == 1
    _assert_complete(out)


def test_sigterm_while_waiting_exits_143_and_the_rerun_collects(setup, tmp_path):
    sim, argv, out = setup(delay=30)
    with (tmp_path / "run1.log").open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv, "--wait"],
                                cwd=REPO, env=subprocess_env(), stdout=sink, stderr=sink)
        deadline = time.monotonic() + KILL_WITHIN_S
        while "created" not in _states(out):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
    sim.configure(delay=0)
    sim.state.batches[next(iter(sim.state.batches))].ends_at = 0  # it ends now
    _rerun(argv)
    assert sim.creates == 1
    _assert_complete(out)
