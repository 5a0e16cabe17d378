"""Fixtures for the export tests: real OUT datasets captioned against the simulator.

The demo images (data/sample) are copied to a session folder and captioned once per
kind of OUT with the normal ``caption`` command against the bundled simulator
(pipeline/sim_thread.py), so every export reads rows a real run committed. Tests that
need duplicates or damage get their own copy of an OUT. ``datasets`` is used offline.

tests/export is a package, so this file is ``export.conftest`` and does not shadow
tests/conftest.py, which other test modules import as ``conftest``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# datasets reads these when it is imported: set before any test imports it.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pipeline.simulator.app import SimConfig  # noqa: E402
from pipeline.simulator.thread import SimThread  # noqa: E402

from .helpers import (  # noqa: E402
    API_KEY,
    PROMPTS,
    REMOTE,
    SAMPLES,
    Captioned,
    Exported,
    caption,
    write_manifest,
)


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
        mp.setenv("CAPTION_API_KEY", API_KEY)
        caption(sim, write_manifest(images, extra), tmp / "out", *args)
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
