"""Helpers of the export tests (fixtures are in conftest.py beside this file)."""

from __future__ import annotations

import csv
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.simulator.thread import SimThread

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "sample"
REMOTE = "http://127.0.0.1:9/remote/dish.jpg"  # a pass-through URL: never fetched
PROMPTS = ("short=Describe the image in one sentence.",
           "tags=List the main objects as comma-separated tags.")
API_KEY = "sk-export-tests"


@dataclass(frozen=True)
class Captioned:
    out: Path
    images: Path  # the folder the manifest's relative paths start from

    def rows(self) -> list[dict[str, Any]]:
        return pq.read_table(self.out).to_pylist()

    def ok(self, prompt: str | None = None) -> dict[str, dict[str, Any]]:
        """The ok rows by id (of one prompt name, if given)."""
        return {r["id"]: r for r in self.rows() if r["status"] == "ok"
                and (prompt is None or r["prompt_name"] == prompt)}


@dataclass
class Exported:
    code: int
    stdout: str
    stderr: str


def write_manifest(folder: Path, extra: list[tuple[str, str, str]]) -> Path:
    """The demo manifest plus ``extra`` (id, image, source) rows, in ``folder``."""
    rows = list(csv.DictReader((SAMPLES / "images.csv").open(encoding="utf-8")))
    rows += [{"id": i, "image": im, "source": src} for i, im, src in extra]
    path = folder / "images.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "source"])
        w.writeheader()
        w.writerows(rows)
    return path


def caption(sim: SimThread, manifest: Path, out: Path, *args: str) -> None:
    """``python -m pipeline caption`` in-process against the simulator."""
    from pipeline.cli import main

    code = main(["caption", str(manifest), "--out", str(out), "--base-url", sim.base_url,
                 "--no-progress", "--retries", "0", "--concurrency", "4", *args])
    assert code in (0, 1), f"caption exited {code}"


def copy_images(c: Captioned, tmp_path: Path) -> Path:
    """A private copy of the captioned images (for --beside-images, with --base-dir)."""
    dst = tmp_path / "imgs"
    shutil.copytree(c.images, dst)
    return dst


def copy_out(c: Captioned, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(c.out, dst)
    return dst


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: (sha256, mtime_ns)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}
