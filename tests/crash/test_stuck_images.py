"""Local image paths that never end, as a real subprocess: a FIFO, a link to /dev/zero
and a 1 GiB junk file become bad_image rows with flat memory and the run ends on its
own; and a read that really is stuck cannot hold the process past --grace after
SIGTERM (finished rows are still flushed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, caption_cmd, read_out, subprocess_env, write_manifest
from fake_gateway import default_caption, img

# The run is started by a bare interpreter that reports its peak RSS: ``ru_maxrss`` of
# a process spawned straight from pytest includes pytest's own peak up to the exec
# (vfork + exec keep the parent's high-water mark), so it would measure the suite.
_MEASURE = """\
import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {ru.ru_maxrss}")
"""


def spawn_measured(cmd: list[str], report: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _MEASURE, str(report), *cmd], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_peak_rss(proc: subprocess.Popen, report: Path, timeout: float) -> tuple[int, float]:
    """Exit code and peak RSS (MB) of the run ``proc`` started, which must end within
    ``timeout``."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the run did not end on its own within {timeout} s")
    code, maxrss = report.read_text().split()
    return int(code), int(maxrss) / 1024


@pytest.mark.slow
def test_fifo_dev_zero_and_1_gib_junk_are_bad_image_rows_with_flat_memory(gateway, tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    with open(tmp_path / "junk.jpg", "wb") as f:
        f.truncate(1 << 30)  # a real 1 GiB file (sparse on disk)
    rows = [{"id": "fifo", "image": "pipe.jpg"}, {"id": "zero", "image": "zero.jpg"},
            {"id": "junk", "image": "junk.jpg"}, {"id": "ok", "image": img("ok")}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    report = tmp_path / "rss.txt"
    proc = spawn_measured(caption_cmd(manifest, out, gateway.base_url), report)
    code, peak = wait_peak_rss(proc, report, 60)
    assert code == 1
    df = read_out(out).set_index("id")
    assert df.loc["ok", "status"] == "ok"
    reasons = {i: df.loc[i, "error"] for i in ("fifo", "zero", "junk")}
    assert set(df.loc[list(reasons), "error_class"]) == {"bad_image"}
    assert "FIFO (named pipe), not a regular file" in reasons["fifo"]
    assert "character device, not a regular file" in reasons["zero"]
    assert f"too large: {1 << 30} bytes" in reasons["junk"]
    print(f"\npeak RSS {peak:.0f} MB")
    assert peak < 300, f"peak RSS {peak:.0f} MB"


STUCK_DRIVER = """
import os, sys
from pathlib import Path
import pipeline.images.load

marker = Path(sys.argv[1])

def stuck(path, max_bytes):
    # A real read() that never returns, as on a hung network mount: nothing is ever
    # written to this pipe. (The type check would refuse a FIFO path, so the read is
    # put in place of the file read itself.)
    marker.write_text(str(path))
    os.read(os.pipe()[0], 1)

pipeline.images.load.read_file = stuck
from pipeline.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigterm_during_a_stuck_read_exits_within_the_grace(gateway, tmp_path):
    marker = tmp_path / "reading"
    urls = [img("ok", f"{i}.jpg") for i in range(3)]
    rows = [{"id": f"ok{i}", "image": u} for i, u in enumerate(urls)]
    rows.insert(1, {"id": "stuck", "image": "mount/stuck.jpg"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    grace = 2.0
    argv = caption_cmd(manifest, out, gateway.base_url, "--grace", str(grace),
                       "--image-timeout", "600", "--flush-rows", "1000",
                       "--flush-seconds", "1000")[3:]  # drop "python -m pipeline"
    proc = subprocess.Popen([sys.executable, "-c", STUCK_DRIVER, str(marker), *argv],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() or sum(c.outcome == "ok" for c in gateway.calls()) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the rows did not start in time"
            time.sleep(0.02)
        time.sleep(0.3)  # let the client take in the answers it was sent
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=grace + 20)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert b"Traceback" not in err, err
    print(f"\nstopped {stopped_in:.1f} s after SIGTERM (grace {grace:g} s)")
    assert stopped_in < grace + 3, f"took {stopped_in:.1f} s to stop"
    df = read_out(out)
    assert sorted(df["id"]) == ["ok0", "ok1", "ok2"]  # flushed; the stuck row stays pending
    assert all(df.set_index("id").loc[f"ok{i}", "caption"] == default_caption(u)
               for i, u in enumerate(urls))
    assert Path(marker.read_text()).name == "stuck.jpg"
