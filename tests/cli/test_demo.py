"""`make demo` is `python -m pipeline demo`: the bundled photos through the simulator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env


@pytest.mark.slow
def test_the_demo_captions_the_bundled_photos_end_to_end(tmp_path) -> None:
    env = subprocess_env(HOME=str(tmp_path))
    env.pop("CAPTION_API_KEY", None)  # the demo needs no key
    proc = subprocess.run([sys.executable, "-m", "pipeline", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "8 rows written to" in proc.stdout
    assert (REPO / "out" / "demo").is_dir()


@pytest.mark.slow
def test_the_quality_demo_catches_each_scripted_caption_and_reasks_it(tmp_path) -> None:
    env = subprocess_env(HOME=str(tmp_path))
    env.pop("CAPTION_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--quality"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = {line.split()[0]: line.split()[1:3] for line in proc.stdout.splitlines()[3:11]}
    assert table["astronaut"][0] == "refusal" and table["chelsea"][0] == "language"
    assert table["camera"][0] == "too_long" and table["rocket"][0] == "boilerplate"
    assert table["text"] == ["too_long", "too_long"]  # still too long after the re-ask
    assert table["hubble"][0] == "I'm"                # the near miss: not re-asked
    assert "24 rows (3 chained prompts); 6 re-asked, 1 still flagged" in proc.stdout


def test_a_demo_writes_where_out_says_and_clears_only_its_own_folder(tmp_path) -> None:
    from pipeline.commands.sample import demo_out

    default = tmp_path / "demo"
    assert demo_out([], default) == (default, True)
    assert demo_out(["--out", "a", "--out=b"], default) == (Path("b"), False)
