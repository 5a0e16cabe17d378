"""SIGKILL the CLI at random moments and resume: every id ends up exactly once.

The fake gateway runs in this process (background thread); the CLI runs as a
subprocess so that SIGKILL is a real crash: no finally blocks, no flush, no unlock.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, caption_cmd, read_out, subprocess_env, write_manifest
from fake_gateway import default_caption, img

N_IMAGES = 60
KILLS = 3


def visible_parts(out: Path) -> list[Path]:
    """Files pandas/pyarrow would read (names starting with . or _ are ignored)."""
    if not out.exists():
        return []
    return [p for p in out.rglob("*") if p.is_file()
            and not any(s.startswith((".", "_")) for s in p.relative_to(out).parts)]


def wait_for_new_parts(proc: subprocess.Popen, out: Path, before: set[Path],
                       timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if set(visible_parts(out)) - before:
            return True
        time.sleep(0.02)
    raise AssertionError("no part file appeared in time")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(gateway, tmp_path):
    rng = random.Random(20261124)
    urls = [img("slow", f"{i:03d}.jpg", n=20, pace=0.03) for i in range(N_IMAGES)]
    manifest = write_manifest(tmp_path / "images.csv",
                              [{"id": f"id{i:03d}", "image": u} for i, u in enumerate(urls)])
    out = tmp_path / "out"
    cmd = caption_cmd(manifest, out, gateway.base_url, "--concurrency", "8",
                      "--flush-rows", "5", "--retries", "2")
    env = subprocess_env()

    kills = 0
    # (requests seen by the kill, ids visible after it): every later request comes from
    # a later run (or was on the wire when the process died, for a row it had not
    # finished), so none of them may be for a committed id
    committed: list[tuple[int, set[str]]] = []
    for _ in range(KILLS):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            if wait_for_new_parts(proc, out, set(visible_parts(out))):
                time.sleep(rng.uniform(0.0, 0.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        seen_by_kill = gateway.count()
        # whatever a crash left behind, the dataset stays readable (no half files)
        df = read_out(out)
        assert not df.empty
        assert (df["status"] == "ok").all()
        for id_, cap, image in zip(df["id"], df["caption"], df["image"]):
            assert cap == default_caption(image), (id_, cap)
        committed.append((seen_by_kill, set(df["id"].astype(str))))

    assert kills >= 2, "the run finished before it could be killed: slow the streams down"

    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert final.returncode == 0, final.stderr

    df = read_out(out)
    ids = list(df["id"].astype(str))
    assert sorted(ids) == [f"id{i:03d}" for i in range(N_IMAGES)], "missing or duplicate ids"
    assert len(set(zip(df["id"], df["prompt_name"]))) == len(df) == N_IMAGES
    assert (df["status"] == "ok").all()
    for cap, image in zip(df["caption"], df["image"]):
        assert cap == default_caption(image)

    # resume: a row that was committed before a kill is never requested again
    by_url = {u: f"id{i:03d}" for i, u in enumerate(urls)}
    calls = gateway.calls()
    for seen_by_kill, done in committed:
        again = {by_url[c.url] for c in calls[seen_by_kill:]} & done
        assert not again, f"committed rows requested again after resume: {sorted(again)}"
