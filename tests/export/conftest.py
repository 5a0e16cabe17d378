"""Fixtures for the export tests: real OUT datasets captioned against the simulator.

The demo images (data/sample) are copied to a session folder and captioned once per
kind of OUT with the normal ``caption`` command against the bundled simulator
(pipeline/sim_thread.py), so every export reads rows a real run committed. Tests that
need duplicates or damage get their own copy of an OUT. ``datasets`` is used offline.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

# datasets reads these when it is imported: set before any test imports it.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pipeline.sim_thread import SimThread  # noqa: E402
from pipeline.simulator import SimConfig  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "sample"
REMOTE = "http://127.0.0.1:9/remote/dish.jpg"  # a pass-through URL: never fetched
PROMPTS = ("short=Describe the image in one sentence.",
           "tags=List the main objects as comma-separated tags.")


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


def _manifest(folder: Path, extra: list[tuple[str, str, str]]) -> Path:
    rows = list(csv.DictReader((SAMPLES / "images.csv").open(encoding="utf-8")))
    rows += [{"id": i, "image": im, "source": src} for i, im, src in extra]
    path = folder / "images.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "source"])
        w.writeheader()
        w.writerows(rows)
    return path


def _caption(sim: SimThread, manifest: Path, out: Path, *args: str) -> None:
    from pipeline.cli import main

    code = main(["caption", str(manifest), "--out", str(out), "--base-url", sim.base_url,
                 "--no-progress", "--retries", "0", "--concurrency", "4", *args])
    assert code in (0, 1), f"caption exited {code}"


@pytest.fixture(scope="session")
def sim() -> Iterator[SimThread]:
    s = SimThread(SimConfig(latency=0.0, tokens_per_second=0.0))
    yield s
    s.stop()


def _captioned(tmp: Path, sim: SimThread, extra: list[tuple[str, str, str]],
               *args: str) -> Captioned:
    images = tmp / "images"
    shutil.copytree(SAMPLES, images)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTION_API_KEY", "sk-export-tests")
        _caption(sim, _manifest(images, extra), tmp / "out", *args)
    return Captioned(tmp / "out", images)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory, sim: SimThread) -> Captioned:
    """The demo images with two choices each, plus a missing file (an error row) and
    an http(s) image (an ok row without a local file)."""
    extra = [("ghost", "ghost.png", "missing on purpose"), ("remote", REMOTE, "a URL")]
    return _captioned(tmp_path_factory.mktemp("demo"), sim, extra, "--n", "2")


@pytest.fixture(scope="session")
def named(tmp_path_factory: pytest.TempPathFactory, sim: SimThread) -> Captioned:
    """The demo images, each captioned with two named prompts (short, tags)."""
    args = [a for p in PROMPTS for a in ("--named-prompt", p)]
    return _captioned(tmp_path_factory.mktemp("named"), sim, [], *args)


@pytest.fixture
def export(capsys: pytest.CaptureFixture[str]) -> Any:
    """``export(*argv)`` runs ``python -m pipeline export`` in-process -> Exported."""
    from pipeline.cli import main

    def run(*argv: object) -> Exported:
        capsys.readouterr()
        try:
            code = main(["export", *map(str, argv), "--no-progress"])
        except SystemExit as e:  # argparse's own errors (one line, exit 2)
            code = int(e.code or 0)
        cap = capsys.readouterr()
        return Exported(code, cap.out, cap.err)

    return run


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
