"""SIGTERM while a row's re-ask is under way, as a real subprocess against the fake
gateway: the row's first answer is paid for, so the row is written with it (flagged,
saying the re-ask did not finish) whatever ``--grace`` is; it is not left pending."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import REPO, caption_cmd, read_out, subprocess_env, write_manifest
from fake_gateway.sse import img

REFUSAL = "I'm sorry, but I can't help with that."


def refusal_then_500(gateway: Any) -> None:
    """The first answer is a refusal; the re-ask gets a 500 (its retry then waits)."""
    async def handler(ctx: Any) -> web.StreamResponse:
        if ctx.attempt == 1:
            return await ctx.ok(REFUSAL)
        return await ctx.json_response(500, {"error": {"message": "boom",
                                                       "type": "server_error"}})
    gateway.on("reaskstop", handler)


@pytest.mark.parametrize("grace", ["30", "0"])
def test_sigterm_while_the_reask_waits_to_retry_keeps_the_paid_first_answer(
        gateway: Any, tmp_path: Path, grace: str) -> None:
    refusal_then_500(gateway)
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "a", "image": img("reaskstop")}])
    out = tmp_path / "out"
    # The re-ask's retry waits 20 s: the signal arrives while no request is open.
    cmd = caption_cmd(manifest, out, gateway.base_url, "--grace", grace, "--retries", "2",
                      "--backoff-base", "20", "--backoff-max", "20")
    row = sigterm_once_reasked(gateway, cmd, settle=0.3,
                               answered=True)  # the 500 taken in: the row sleeps to retry
    assert (row["status"], row["caption"], list(row["quality_flags"])) == \
        ("ok", REFUSAL, ["refusal"])
    assert "the re-ask did not finish" in row["quality_notes"]
    assert gateway.count() == 2


def refusal_then_slow(gateway: Any) -> None:
    """The first answer is a refusal; the re-ask's answer streams for about 1.5 s."""
    async def handler(ctx: Any) -> web.StreamResponse:
        if ctx.attempt == 1:
            return await ctx.ok(REFUSAL)
        return await ctx.ok("A red camera on a wooden table by a window.", pace=0.15)
    gateway.on("reaskslow", handler)


@pytest.mark.parametrize("grace,caption,flags", [
    ("30", "A red camera on a wooden table by a window.", []),
    ("0", REFUSAL, ["refusal"])], ids=["grace", "no-grace"])
def test_sigterm_while_the_reask_streams_keeps_it_within_the_grace_else_the_first_answer(
        gateway: Any, tmp_path: Path, grace: str, caption: str, flags: list[str]) -> None:
    refusal_then_slow(gateway)
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "a", "image": img("reaskslow")}])
    out = tmp_path / "out"
    cmd = caption_cmd(manifest, out, gateway.base_url, "--grace", grace)
    row = sigterm_once_reasked(gateway, cmd, settle=0.2)  # the re-ask's answer streams
    assert (row["status"], row["caption"], list(row["quality_flags"])) == \
        ("ok", caption, flags)


def sigterm_once_reasked(gateway: Any, cmd: list[str], settle: float,
                         answered: bool = False) -> Any:
    """Run ``cmd``; SIGTERM ``settle`` s after the re-ask went out (``answered``: and its
    answer came back); exit 143, no traceback, one row in OUT: that row."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while gateway.count() < 2 or (answered and gateway.calls()[-1].outcome is None):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the re-ask was not sent in time"
            time.sleep(0.02)
        time.sleep(settle)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143 and b"Traceback" not in err, err
    df = read_out(Path(cmd[cmd.index("--out") + 1]))
    assert len(df) == 1, err.decode()
    return df.iloc[0]
