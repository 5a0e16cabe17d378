"""jobs/crontab.example, run the way cron runs it: its exact command line, under both
`sh` and `bash`, logs one line per run with the run's real exit code.

The command is taken from the file unchanged; only what cron itself does is done here
(the crontab's NAME=value lines become the environment, `\\%` becomes `%`, the command
goes to the shell with `-c`). The variables point at a temporary install whose
`.venv/bin/python` starts this interpreter and whose job file targets the loopback
gateway, one job per exit code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_manifest
from fake_gateway import img
from test_jobs_and_operations import tiny_pngs

CRONTAB = REPO / "jobs" / "crontab.example"
EXIT_LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) exit (\d+)")


def cron_entry(text: str) -> tuple[dict[str, str], str]:
    """The crontab's environment lines and its one command, as cron reads them."""
    env: dict[str, str] = {}
    commands = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assignment = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", line)
        if assignment:
            env[assignment.group(1)] = assignment.group(2)
            continue
        commands.append(line.split(None, 5)[5])
    (command,) = commands
    return env, _cron_percent(command)


def _cron_percent(command: str) -> str:
    """cron's rule: `\\%` is a literal %, an unescaped % ends the command."""
    out, i = [], 0
    while i < len(command):
        if command.startswith("\\%", i):
            out.append("%")
            i += 2
            continue
        if command[i] == "%":
            break
        out.append(command[i])
        i += 1
    return "".join(out)


def install(home: Path, python: str) -> None:
    """What the crontab expects under $CAPTION_HOME: .venv/bin/python and jobs/."""
    bin_dir = home / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    launcher = bin_dir / "python"
    launcher.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{python}" "$@"\n')
    launcher.chmod(0o755)
    (home / "jobs").mkdir()
    tiny_pngs(home / "pics", 2)


def job(home: Path, base_url: str, case: int) -> None:
    rows = {0: [{"id": "a", "image": "../pics/im0.png"}],
            1: [{"id": "a", "image": "../pics/im0.png"}, {"id": "gone", "image": "../nope.png"}],
            3: [{"id": "deny", "image": img("C35-401")}],
            5: [{"id": "a", "image": "../pics/im1.png"}]}[case]
    write_manifest(home / "jobs" / f"m{case}.csv", rows)
    budget = "max_cost = 0.000001\n[price]\ninput = 1000.0\noutput = 1000.0\n" if case == 5 \
        else ""
    (home / "jobs" / "example.toml").write_text(
        f'manifest = "m{case}.csv"\nout = "../out{case}"\n[api]\nbase_url = "{base_url}"\n'
        f"[limits]\nretries = 0\n{budget}")


@pytest.mark.slow
@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_the_crontab_line_logs_each_runs_exit_code(gateway, tmp_path, shell):
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} is not installed")
    cron_env, command = cron_entry(CRONTAB.read_text(encoding="utf-8"))
    assert set(cron_env) == {"CAPTION_HOME", "CAPTION_KEY_FILE", "CAPTION_LOG"}
    home, log, key = tmp_path / "home", tmp_path / "caption.log", tmp_path / "key"
    install(home, sys.executable)
    key.write_text("sk-cron-test\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHELL": path, "LOGNAME": "cron",
           "NO_PROXY": "127.0.0.1", "CAPTION_HOME": str(home),
           "CAPTION_KEY_FILE": str(key), "CAPTION_LOG": str(log)}
    codes = [0, 1, 3, 5]
    for case in codes:
        job(home, gateway.base_url, case)
        done = subprocess.run([path, "-c", command], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout == done.stderr == "", done
    text = log.read_text(encoding="utf-8")
    exits = [m for m in map(EXIT_LINE.fullmatch, text.splitlines()) if m]
    assert [int(m.group(2)) for m in exits] == codes, text
    assert text.splitlines()[-1] == exits[-1].group(0)          # one line ends each run
    assert text.count("summary: ") == len(codes)                # and the runs' own lines
    assert "error: " in text and "stopped: " in text            # (exit 3 and exit 5)
    assert {c.headers.get("Authorization") for c in gateway.calls()} == {"Bearer sk-cron-test"}
