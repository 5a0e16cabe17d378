"""`make demo` is `python -m pipeline demo`: the bundled photos through the simulator."""

from __future__ import annotations

import subprocess
import sys

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
