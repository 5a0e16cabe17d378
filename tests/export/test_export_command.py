"""``python -m pipeline export``: one line and exit 2 for bad arguments or an unreadable
OUT, a non-empty DEST refused, a locked OUT (4), a full disk (6), SIGTERM (143), and
the README's option table against ``--help``."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .helpers import Captioned, copy_out

REPO = Path(__file__).resolve().parents[2]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["--format", "jsonl"], "--format jsonl needs --to DEST"),
    (["--format", "sidecar"], "needs --to DEST (or --beside-images)"),
    (["--to", "x.jsonl"], "the following arguments are required: --format"),
    (["--format", "xml", "--to", "d"], "invalid choice: 'xml'"),
    (["--format", "webdataset", "--to", "d"], "OUT was not captioned from shards"),
    (["--format", "webdataset", "--to", "d", "--columns", "id"], "not for --format webdataset"),
    (["--format", "jsonl", "--to", "x.jsonl", "--policy", "append"],
     "--policy is for --format sidecar"),
    (["--format", "csv", "--to", "x.csv", "--beside-images"],
     "--beside-images is for --format sidecar"),
    (["--format", "sidecar", "--beside-images", "--to", "d"], "drop --to"),
    (["--format", "sidecar", "--beside-images", "--images", "copy"], "never writes image"),
    (["--format", "csv", "--to", "x.csv", "--images", "copy"], "--images is for"),
    (["--format", "sidecar", "--to", "d", "--extension", "txt"], "--extension wants"),
    (["--format", "sidecar", "--to", "d", "--columns", "id"], "not for --format sidecar"),
    (["--format", "jsonl", "--to", "x.jsonl", "--shard-size", "5"], "--shard-size is for"),
    (["--format", "hf-parquet", "--to", "d", "--shard-size", "0"], "at least 1"),
    (["--format", "jsonl", "--to", "x.jsonl", "--trigger", " "], "--trigger wants a word"),
    (["--format", "jsonl", "--to", "x.jsonl", "--base-dir", "nowhere"], "not a directory"),
    (["--format", "jsonl", "--to", "x.jsonl", "--columns", "caption,nope"],
     "OUT has no column 'nope'"),
    (["--format", "hf-parquet", "--to", "d", "--columns", "image,caption"],
     "'image' is written by --format hf-parquet itself"),
    (["--format", "jsonl", "--to", "x.jsonl", "--prompt-name", "nope"],
     "no rows of that prompt (it has: default)"),
    (["--format", "hf-imagefolder", "--to", "d", "--images", "none"], "needs the images"),
])
def test_bad_arguments_exit_2_with_one_line(demo: Captioned, export, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            args: list[str], says: str) -> None:
    monkeypatch.chdir(tmp_path)
    r = export(demo.out, *args)
    assert r.code == 2
    assert says in one_line(r.stderr)
    assert sorted(os.listdir(tmp_path)) == []  # nothing written


def _foreign_part(out: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2]}), out / "part-foreign.parquet")


def _conflicting_part(out: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "prompt_name": ["default"], "status": ["ok"],
                             "width": ["wide"]}), out / "part-zz.parquet")


@pytest.mark.parametrize("damage, says", [
    (lambda out: (out / "part-bad.parquet").write_bytes(b"PAR1 not really"),
     "part-bad.parquet: not a readable Parquet file"),
    (_foreign_part,
     "part-foreign.parquet is not a part of a caption dataset: no string column 'id'"),
    (_conflicting_part, "disagree on a column's type"),
    (lambda out: [p.unlink() for p in out.glob("part-*.parquet")], "holds no committed rows"),
])
def test_an_unreadable_out_exits_2_with_one_line(demo: Captioned, export, tmp_path: Path,
                                                 damage, says: str) -> None:  # type: ignore[no-untyped-def]
    out = copy_out(demo, tmp_path)
    damage(out)
    r = export(out, "--to", tmp_path / "c.jsonl", "--format", "jsonl")
    assert r.code == 2
    assert says in one_line(r.stderr)
    assert not (tmp_path / "c.jsonl").exists()


def test_out_that_is_not_a_directory_exits_2(export, tmp_path: Path) -> None:
    r = export(tmp_path / "nothing", "--to", tmp_path / "c.jsonl", "--format", "jsonl")
    assert r.code == 2 and "is not a directory" in one_line(r.stderr)


@pytest.mark.parametrize("fmt, dest", [("jsonl", "c.jsonl"), ("hf-parquet", "dir"),
                                       ("sidecar", "dir"), ("hf-imagefolder", "dir")])
def test_a_non_empty_destination_is_refused_unless_forced(
        demo: Captioned, export, tmp_path: Path, fmt: str, dest: str) -> None:
    target = tmp_path / dest
    if dest == "dir":
        target.mkdir()
        (target / "keep.me").write_text("mine", encoding="utf-8")
    else:
        target.write_text("mine\n", encoding="utf-8")
    r = export(demo.out, "--to", target, "--format", fmt)
    assert r.code == 2 and "pass --force" in one_line(r.stderr)
    assert export(demo.out, "--to", target, "--format", fmt, "--force").code == 0
    if dest == "dir":
        assert (target / "keep.me").read_text(encoding="utf-8") == "mine"


def test_a_destination_inside_out_is_refused(demo: Captioned, export, tmp_path: Path) -> None:
    out = copy_out(demo, tmp_path)
    r = export(out, "--to", out / "export", "--format", "hf-parquet")
    assert r.code == 2 and "is inside OUT" in one_line(r.stderr)
    assert not (out / "export").exists()


def test_an_out_locked_by_a_caption_run_exits_4(demo: Captioned, export,
                                                tmp_path: Path) -> None:
    out = copy_out(demo, tmp_path)
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"4242", 0)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = export(out, "--to", tmp_path / "c.jsonl", "--format", "jsonl")
    finally:
        os.close(fd)
    assert r.code == 4 and "being written by a caption run (pid 4242)" in one_line(r.stderr)


def test_a_caption_run_cannot_start_while_an_export_reads_out(
        demo: Captioned, sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.cli import main
    from pipeline.export.reader import open_committed

    out = copy_out(demo, tmp_path)
    with open_committed(out), pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTION_API_KEY", "sk-export-tests")
        code = main(["caption", str(demo.images / "images.csv"), "--out", str(out),
                     "--base-url", sim.base_url, "--no-progress"])
    assert code == 4


def test_a_quiet_export_prints_only_its_summary(demo: Captioned, export,
                                                tmp_path: Path) -> None:
    r = export(demo.out, "--to", tmp_path / "c.csv", "--format", "csv")
    assert r.stderr == ""  # no TTY: no progress bar
    assert re.fullmatch(r"export csv: 9 rows, 9 written -> \S+; skipped: 1 keys whose "
                        r"best row is an error \(--include-errors\)\n", r.stdout)


def test_a_tty_shows_a_progress_bar(demo: Captioned, tmp_path: Path) -> None:
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "export", str(demo.out),
                               "--to", str(tmp_path / "c.jsonl"), "--format", "jsonl"],
                              env=env, stdout=subprocess.PIPE, stderr=follower, timeout=60)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the follower side is closed: all was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0
    assert b"9/9" in shown and b"row" in shown  # tqdm's bar: rows done / total


def test_a_full_disk_exits_6_with_one_line_and_no_temporary_files(
        demo: Captioned, export, small_disk, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    disk = small_disk(size="1m")
    r = export(demo.out, "--to", disk.path / "dest", "--format", "hf-parquet")
    assert r.code == 6
    line = one_line(r.stderr)
    assert line.startswith("export: error: cannot write ") and "No space left" in line
    assert not list(disk.path.rglob("*.tmp"))


def test_sigterm_stops_an_export_and_leaves_no_file_behind(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests" / "bench"))
    from bench_export import make_out

    out = make_out(tmp_path, 300_000)
    dest = tmp_path / "c.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "export", str(out), "--to",
                             str(dest), "--format", "jsonl"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".c.jsonl.*.tmp")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert not dest.exists() and not list(tmp_path.glob(".c.jsonl.*"))


def test_every_help_option_is_in_the_readme_and_back() -> None:
    from pipeline.export.command import build_parser

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Export options"):]
    section = section[:section.index("\n## ")]
    documented = {flag for line in section.splitlines() if line.startswith("| `")
                  for flag in re.findall(r"`(-{1,2}[a-z][a-z-]*)", line.split("|")[1])}
    flags = {o for a in build_parser()._actions for o in a.option_strings
             if o not in ("-h", "--help")}
    assert flags - documented == set()
    assert documented - flags == set()
