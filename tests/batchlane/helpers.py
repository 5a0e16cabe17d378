"""The batch lane's tests: the simulator (both batch APIs) on 127.0.0.1 in a thread, the
CLI in-process or as a real subprocess, and manifests of distinct generated images."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST, REPO, read_out, subprocess_env, write_manifest
from PIL import Image

from pipeline.simulator.app import SimConfig
from pipeline.simulator.batch import BATCH, BatchConfig, BatchState
from pipeline.simulator.thread import SimThread

MODEL = "claude-3-5-sonnet-20240620"  # priced in the built-in table: $3 / $15 online


class Sim:
    """The simulator with a batch scenario that a test may change between runs."""

    def __init__(self, **batch: Any) -> None:
        self.thread = SimThread(SimConfig(latency=0.0, tokens_per_second=0.0,
                                          batch=BatchConfig(**batch)))
        self.base_url = self.thread.base_url

    @property
    def state(self) -> BatchState:
        return self.thread.runner.app[BATCH]

    @property
    def creates(self) -> int:
        return self.state.creates

    def configure(self, **batch: Any) -> None:
        """Change the scenario (read per request, so it applies to the next one)."""
        self.state.config = replace(self.state.config, **batch)

    def stop(self) -> None:
        self.thread.stop()


@pytest.fixture
def sim() -> Iterator[Any]:
    made: list[Sim] = []

    def make(**batch: Any) -> Sim:
        made.append(Sim(**batch))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def images_manifest(folder: Path, n: int, name: str = "images.csv") -> Path:
    """``n`` distinct tiny PNGs (their own bytes, so none is a copy of another)."""
    img_dir = folder / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = img_dir / f"{i:05d}.png"
        if not path.exists():
            Image.new("RGB", (8 + i % 7, 8 + i // 7 % 7),
                      (i * 37 % 256, i * 91 % 256, i * 13 % 256)).save(path)
        rows.append({"id": f"k{i:05d}", "image": f"img/{path.name}"})
    return write_manifest(folder / name, rows)


def batch_argv(manifest: Path, out: Path, base_url: str, *args: str) -> list[str]:
    return ["caption", str(manifest), "--out", str(out), "--base-url", base_url,
            "--model", MODEL, "--lane", "batch", "--poll-interval", "0.1", *FAST, *args]


def run_cli(argv: list[str]) -> int:
    from pipeline.cli import main

    return main(argv)


def run_subprocess(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def one_row_per_key(out: Path) -> Any:
    df = read_out(out)
    assert not df.empty
    assert not df.duplicated(["id", "prompt_name"]).any(), \
        df[df.duplicated(["id", "prompt_name"], keep=False)][["id", "status", "lane"]]
    return df
