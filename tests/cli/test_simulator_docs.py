"""The simulator's triggers are documented where a user looks: `simulate --help` and
the README list every one of them, taken from the simulator's own constants."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, subprocess_env

from pipeline.simulator.app import FAULT_MODES, INVALID_KEY
from pipeline.simulator.help import FAULT_HELP


def readme_simulator_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("### The simulator's triggers")
    return text[start:text.index("\n## ", start)]


def test_every_fault_mode_has_its_help() -> None:
    assert set(FAULT_HELP) == set(FAULT_MODES)


def test_simulate_help_lists_the_invalid_key_and_every_fault_mode() -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", "simulate", "--help"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"API key {INVALID_KEY}: HTTP 401" in done.stdout
    for mode in FAULT_MODES:
        assert f"  {mode}: {FAULT_HELP[mode]}" in done.stdout, mode


def test_the_readme_lists_the_same_triggers() -> None:
    section = readme_simulator_section()
    assert f"`{INVALID_KEY}`" in section
    for mode in FAULT_MODES:
        assert f"`{mode}`" in section, mode
