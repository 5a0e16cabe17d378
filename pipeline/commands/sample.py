"""What both demos share: the bundled sample photos and the simulator in a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["MANIFEST", "ROOT", "start_simulator"]

ROOT = Path(__file__).resolve().parents[2]  # the repository: pipeline/commands/sample.py
MANIFEST = ROOT / "data" / "sample" / "images.csv"


def start_simulator(*flags: str) -> tuple[subprocess.Popen[str], str]:
    """The bundled simulator on a free port, in its own process; (process, base URL)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "simulate", "--port", "0",
                             *flags], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"demo: the simulator did not start (said {line!r})")
    return proc, line.rsplit(" ", 1)[-1]
