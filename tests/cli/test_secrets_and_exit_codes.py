"""The CLI edge, as a subprocess: secrets never leak, exit codes, one-line errors,
the output lock and signal handling."""

from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, caption_cmd, read_out, subprocess_env, write_manifest
from fake_gateway import default_caption, img

SECRET = "sk-test-SECRET-123"


def run(cmd: list[str], timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(**env), capture_output=True,
                          timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- secrets


def test_api_key_never_appears_in_output_logs_or_files(gateway, tmp_path):
    rows = [{"id": "ok", "image": img("ok")},
            {"id": "bad", "image": img("bad400")},
            {"id": "boom", "image": img("s500")}]
    fatal_rows = rows + [{"id": "deny", "image": img("C35-401")},
                         {"id": "after", "image": img("ok", "after.jpg")}]
    m1 = write_manifest(tmp_path / "batch.csv", rows)
    m2 = write_manifest(tmp_path / "fatal.csv", fatal_rows)
    out1, out2 = tmp_path / "out1", tmp_path / "out2"

    p1 = run(caption_cmd(m1, out1, gateway.base_url, "--retries", "1", "--concurrency", "1"),
             CAPTION_API_KEY=SECRET)
    p2 = run(caption_cmd(m2, out2, gateway.base_url, "--retries", "1", "--concurrency", "1"),
             CAPTION_API_KEY=SECRET)
    assert p1.returncode == 1, p1.stderr
    assert p2.returncode == 3, p2.stderr
    # the key was really used, so its absence below means something
    auth = {c.headers.get("Authorization") for c in gateway.calls()}
    assert auth == {f"Bearer {SECRET}"}
    statuses = {c.status for c in gateway.calls()}
    assert {200, 400, 500, 401} <= statuses

    leaks = []
    for name, blob in (("stdout1", p1.stdout), ("stderr1", p1.stderr),
                       ("stdout2", p2.stdout), ("stderr2", p2.stderr)):
        if SECRET.encode() in blob:
            leaks.append(name)
    files = [p for d in (out1, out2) for p in d.rglob("*") if p.is_file()]
    assert files, "no output files were written"
    leaks += [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaks == []
    df = read_out(out1)
    assert sorted(df["id"]) == ["bad", "boom", "ok"]


def test_a_gateway_that_quotes_the_key_back_leaks_it_nowhere(gateway, tmp_path):
    rows = [{"id": "ok", "image": img("ok")},
            {"id": "quoted400", "image": img("echokey")},
            {"id": "quotedstream", "image": img("echokey-stream")},
            {"id": "quotedcaption", "image": img("echokey-caption")}]
    m1 = write_manifest(tmp_path / "batch.csv", rows)
    m2 = write_manifest(tmp_path / "fatal.csv", [{"id": "quoted401",
                                                  "image": img("echokey-401")}])
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    args = ("--retries", "1", "--concurrency", "1", "-v")
    runs = [run(caption_cmd(m1, out1, gateway.base_url, *args), CAPTION_API_KEY=SECRET),
            run(caption_cmd(m2, out2, gateway.base_url, *args), CAPTION_API_KEY=SECRET)]
    assert [p.returncode for p in runs] == [1, 3], [p.stderr for p in runs]
    # the key was sent and quoted back, so its absence below means something
    assert {c.headers.get("Authorization") for c in gateway.calls()} == {f"Bearer {SECRET}"}
    assert {400, 401, 200} <= {c.status for c in gateway.calls()}
    assert b"DEBUG row quoted400" in runs[0].stderr  # -v was on
    df = read_out(out1).set_index("id")
    for out in (out1, out2):
        runs.append(run([sys.executable, "-m", "pipeline", "status", str(out)]))
        runs.append(run([sys.executable, "-m", "pipeline", "report", str(out)]))
    assert runs[2].returncode == 0 and runs[3].returncode == 0, runs[2].stderr + runs[3].stderr
    assert (out1 / "_report.html").exists() and list((out1 / "_runs").glob("*.json"))

    leaks = [f"{i}:{name}" for i, p in enumerate(runs)
             for name, blob in (("stdout", p.stdout), ("stderr", p.stderr))
             if SECRET.encode() in blob]
    files = [p for d in (out1, out2) for p in d.rglob("*") if p.is_file()]
    leaks += [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert "Invalid image for key ***" in df.loc["quoted400", "error"]
    assert "upstream refused key ***" in df.loc["quotedstream", "error"]
    assert "a note on it reads *** and ***." in df.loc["quotedcaption", "caption"]
    assert df.loc["quotedcaption", "reasks"] == 1  # the refusal quoting it was re-asked
    assert b"Incorrect API key provided: ***" in runs[1].stderr


# --------------------------------------------------------------------------- exit code 2


def _no_image_column(tmp_path: Path) -> Path:
    return write_manifest(tmp_path / "m.csv", [{"id": "1", "path": "a.png"}])


@pytest.mark.parametrize("case", ["missing_manifest", "no_image_column", "no_endpoint"])
def test_usage_and_config_errors_exit_2_with_one_line(gateway, tmp_path, case):
    good = write_manifest(tmp_path / "good.csv", [{"id": "1", "image": img("ok")}])
    out = tmp_path / "out"
    if case == "missing_manifest":
        cmd = caption_cmd(tmp_path / "nope.csv", out, gateway.base_url)
    elif case == "no_image_column":
        cmd = caption_cmd(_no_image_column(tmp_path), out, gateway.base_url)
    else:
        cmd = caption_cmd(good, out, gateway.base_url)
        i = cmd.index("--base-url")
        del cmd[i:i + 2]
    proc = run(cmd, timeout=30)
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    word = {"missing_manifest": "nope.csv", "no_image_column": "image",
            "no_endpoint": "url"}[case]
    assert word in line.lower() or word in line
    assert gateway.count() == 0


# --------------------------------------------------------------------------- exit code 4


def test_locked_output_exits_4(gateway, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "1", "image": img("ok")}])
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        proc = run(caption_cmd(manifest, out, gateway.base_url), timeout=30)
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    assert proc.returncode == 4, proc.stderr
    one_line_error(proc)
    assert gateway.count() == 0
    assert read_out(out).empty


# --------------------------------------------------------------------------- signals


@pytest.mark.slow
def test_a_signal_stops_the_run_and_flushes_finished_rows(gateway, tmp_path):
    """The real process's half; every signal's exit code, the grace and the second
    signal are specified at the session and engine seams (tests/unit/test_session.py,
    tests/unit/test_local_engine.py)."""
    urls = [img("slow", f"{i:02d}.jpg", n=10, pace=0.02) for i in range(10)]
    manifest = write_manifest(tmp_path / "m.csv",
                              [{"id": f"s{i:02d}", "image": u} for i, u in enumerate(urls)])
    out = tmp_path / "out"
    # flushing is left to the shutdown path: no size/time flush can happen first
    cmd = caption_cmd(manifest, out, gateway.base_url, "--concurrency", "2",
                      "--flush-rows", "1000", "--flush-seconds", "1000", "--grace", "5")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while sum(c.outcome == "ok" for c in gateway.calls()) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no row finished in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert b"Traceback" not in err, err
    df = read_out(out)
    got = dict(zip(df["image"], df["caption"]))
    # Every stream the server finished was read and written: those done before the
    # signal, and those in flight, which the grace (5 s) let finish.
    streamed = {c.url for c in gateway.calls() if c.outcome == "ok"}
    assert len(streamed) >= 3 and streamed == set(got)
    assert len(df) == len(set(df["id"])) < len(urls)
    assert all(got[u] == default_caption(u) for u in streamed)
    assert (df["status"] == "ok").all()

    # and a rerun completes the rest, each id once
    gateway.clear()
    rerun = run(cmd, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    df2 = read_out(out)
    assert sorted(df2["id"]) == [f"s{i:02d}" for i in range(10)]
    assert not ({c.url for c in gateway.calls()} & streamed)


@pytest.mark.slow
def test_a_second_sigint_stops_at_once_and_still_flushes(gateway, tmp_path):
    # Two rows finish; two stall for two minutes: after one SIGINT the run would wait out
    # its 60 s grace for them, a second SIGINT must end it at once, keeping finished rows.
    urls = [img("C01", f"ok{i}.jpg") for i in range(2)] + \
           [img("C39", f"stuck{i}.jpg", stall=120) for i in range(2)]
    manifest = write_manifest(tmp_path / "m.csv",
                              [{"id": f"r{i}", "image": u} for i, u in enumerate(urls)])
    out = tmp_path / "out"
    cmd = caption_cmd(manifest, out, gateway.base_url, "--concurrency", "4",
                      "--flush-rows", "1000", "--flush-seconds", "1000", "--grace", "60",
                      "--read-timeout", "300")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while (sum(c.outcome == "ok" for c in gateway.calls()) < 2
               or sum(c.outcome == "stalled" for c in gateway.calls()) < 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "rows did not start in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):  # the grace holds it ...
            proc.wait(timeout=0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)  # ... until the second one (grace: 60 s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    # the client hung up on both stalled streams; the server never gave up on them
    assert [c.outcome for c in gateway.calls() if "stuck" in (c.url or "")] == \
        ["client_gone"] * 2
    df = read_out(out)
    assert sorted(df["id"]) == ["r0", "r1"] and (df["status"] == "ok").all()
