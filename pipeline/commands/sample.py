"""What both demos share: the bundled sample photos and the simulator in a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["MANIFEST", "ROOT", "demo_out", "start_simulator"]

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


def demo_out(argv: list[str], default: Path) -> tuple[Path, bool]:
    """Where a demo writes: the last ``--out`` in ``argv`` (as argparse takes it), else
    ``default``; and whether it is the demo's own folder, which it may clear first."""
    out: Path | None = None
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            out = Path(argv[i + 1])
        elif a.startswith("--out="):
            out = Path(a.split("=", 1)[1])
    return (out, False) if out is not None else (default, True)
