"""A chain tags → long → short on the demo images, SIGKILLed mid-run and resumed.

The CLI runs as a subprocess against the bundled simulator (in this process), so the
kill is a real crash. After the resume every (id, prompt) is there exactly once, in
order, and each dependent row used (and records) the caption its upstream row holds.
"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import time
from itertools import cycle
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import REPO, SAMPLES, caption_cmd, read_out, subprocess_env, write_manifest

from pipeline.run.chain import caption_hash
from pipeline.simulator.app import SimConfig
from pipeline.simulator.thread import SimThread

N = 24
CHAIN = ["--named-prompt", "short=Shorten this to one line: {caption.long}",
         "--named-prompt", "long=Write a long caption that uses these tags: {caption.tags}",
         "--named-prompt", "tags=List tags for this image."]  # given out of order on purpose
UPSTREAM = {"long": "tags", "short": "long"}


def wait_for_rows(out: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        journal = out / "_journal"
        if journal.exists() and any(journal.iterdir()):
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_a_chain_runs_in_order_and_resumes_after_sigkill_with_each_row_once(
        tmp_path: Path) -> None:
    images = sorted(SAMPLES.glob("*.png")) + sorted(SAMPLES.glob("*.jpg"))
    rows = [{"id": f"img{i:02d}", "image": str(p)} for i, p in zip(range(N), cycle(images))]
    manifest = write_manifest(tmp_path / "images.csv", rows)
    out = tmp_path / "out"
    sim = SimThread(SimConfig(latency=0.05, tokens_per_second=400, split_bytes=7))
    try:
        cmd = caption_cmd(manifest, out, sim.base_url, *CHAIN, "--no-dedupe",
                          "--concurrency", "4", "--flush-rows", "4")
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_rows(out, proc)
        time.sleep(0.3)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert killed, "the run ended before the kill: slow the simulator down"
        partial = len(read_out(out)) if out.exists() else 0
        assert partial < 3 * N
        resumed_at = pd.Timestamp.now(tz="UTC")
        done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        bodies = list(sim.stats.bodies)
    finally:
        sim.stop()

    df = read_out(out)
    assert len(df) == 3 * N and len(set(zip(df["id"], df["prompt_name"]))) == 3 * N
    assert (df["status"] == "ok").all()
    by_key = {(r.id, r.prompt_name): r for r in df.itertuples()}
    prompts = [json.dumps(b) for b in bodies]
    crossed = 0  # dependents whose upstream finished before the kill: read from OUT
    for (rid, name), row in by_key.items():
        if name not in UPSTREAM:
            assert not isinstance(row.upstream, str)  # null
            continue
        up = by_key[(rid, UPSTREAM[name])]
        assert json.loads(row.upstream) == {UPSTREAM[name]: caption_hash(up.caption)}
        assert up.finished_at <= row.finished_at
        crossed += up.finished_at < resumed_at <= row.finished_at
        assert any(json.dumps(up.caption)[1:-1] in p for p in prompts), (rid, name)
    assert crossed >= 1


def test_a_resumed_chain_under_a_failed_image_logs_no_unretrieved_task_error(
        caption: Any, tmp_path: Path) -> None:
    # The image fails, so its first prompt is a bad_image row; a rerun retries only the
    # dependents (upstream errors), which fail without taking the image: its preparation
    # failed with nobody awaiting it, and asyncio logged a traceback for it.
    bad = tmp_path / "bad.png"
    bad.write_bytes((SAMPLES / "camera.png").read_bytes()[:200])
    rows = [{"id": "bad", "image": str(bad)}]
    sim = SimThread(SimConfig(latency=0, tokens_per_second=0))
    try:
        first = caption(rows, *CHAIN, base_url=sim.base_url)
        assert sorted(first.df["error_class"]) == ["bad_image", "upstream", "upstream"]
        again = caption(rows, *CHAIN, base_url=sim.base_url)
        gc.collect()  # a task's unretrieved exception is logged when it is collected
        again.stderr += caption.capfd.readouterr().err
    finally:
        sim.stop()
    assert again.code == 1 and sorted(again.df["error_class"]) == \
        ["bad_image", "upstream", "upstream"]
    assert "never retrieved" not in again.stderr and "Traceback" not in again.stderr
