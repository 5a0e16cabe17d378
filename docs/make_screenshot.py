"""`make docs-screenshot`: regenerate docs/gallery.png from a real demo run.

Runs `python -m pipeline demo` (the bundled simulator, no key, no network) with two
named prompts, writes the review gallery with `python -m pipeline report`, and has
headless Chromium (Debian's /usr/bin/chromium) take the screenshot the README shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "demo"
SHOT = ROOT / "docs" / "gallery.png"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PROMPTS = ["--named-prompt", "short=Write one factual caption for this image in a single "
           "sentence.", "--named-prompt", "tags=List 5 to 10 comma-separated tags for this "
           "image (source: {source})."]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]


def run(*cmd: str) -> None:
    done = subprocess.run(cmd, cwd=ROOT, timeout=300, check=False)
    if done.returncode != 0:
        sys.exit(f"docs-screenshot: `{' '.join(cmd[:4])} ...` exited {done.returncode}")


def main() -> int:
    if not os.access(CHROMIUM, os.X_OK):
        sys.exit(f"docs-screenshot: {CHROMIUM} not found (apt-get install chromium, or set "
                 "CHROMIUM=/path/to/chromium)")
    run(sys.executable, "-m", "pipeline", "demo", *PROMPTS)
    page = OUT / "_report.html"
    run(sys.executable, "-m", "pipeline", "report", str(OUT), "--manifest",
        str(ROOT / "data" / "sample" / "images.csv"), "--thumb-size", "120")
    with tempfile.TemporaryDirectory() as profile:
        shot = Path(profile) / "gallery.png"
        subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,960",
                        f"--screenshot={shot}", page.as_uri()], capture_output=True,
                       timeout=120, check=False)
        data = shot.read_bytes() if shot.exists() else b""
        if not data.startswith(b"\x89PNG"):
            sys.exit("docs-screenshot: chromium wrote no screenshot")
        SHOT.write_bytes(data)
    print(f"docs-screenshot: {SHOT.relative_to(ROOT)} ({len(data) // 1024} KiB) from {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
