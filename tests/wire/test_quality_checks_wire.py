"""The quality checks that need no scripted answer, against the bundled simulator: its
real captions ("... dominated by grey tones ...", about 20 words, JSON with
--response-format) fail the bounds a user sets, are re-asked once and, still failing,
flagged (policy flag) — each check catches its case over real loopback HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLES

from pipeline.simulator.app import SimConfig
from pipeline.simulator.thread import SimThread

ROW = [{"id": "camera", "image": str(SAMPLES / "camera.png")}]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimThread]:
    server = SimThread(SimConfig(latency=0, tokens_per_second=0, split_bytes=5))
    try:
        yield server
    finally:
        server.stop()


def run(caption: Any, sim: SimThread, *args: str) -> dict[str, Any]:
    sim.stats.bodies.clear()
    res = caption(ROW, *args, base_url=sim.base_url, concurrency=1)
    assert res.code == 0, res.stderr
    return res.row("camera")  # type: ignore[no-any-return]


@pytest.mark.parametrize("args,flag", [
    (("--quality-banned-phrase", "Tones"), "banned_phrase"),
    (("--quality-min-words", "200"), "too_short"),
    (("--quality-max-chars", "40"), "too_long"),
], ids=["banned", "min-words", "max-chars"])
def test_a_bound_the_simulators_captions_break_is_flagged_after_one_reask(
        caption: Any, sim: SimThread, args: tuple[str, ...], flag: str) -> None:
    row = run(caption, sim, *args)
    assert (row["status"], row["reasks"], row["reask_flags"], row["quality_flags"]) == \
        ("ok", 1, [flag], [flag])
    assert len(sim.stats.bodies) == 2


def test_a_json_caption_breaking_the_quality_schema_is_flagged(
        caption: Any, sim: SimThread, tmp_path: Path) -> None:
    schema = tmp_path / "needs-tags.json"
    schema.write_text(json.dumps({"type": "object", "required": ["caption", "tags"]}))
    row = run(caption, sim, "--response-format", "json_object",
              "--quality-json-schema", str(schema))
    assert row["json_valid"] is True and row["quality_flags"] == ["json_schema"]
    assert "tags" in row["quality_notes"]
    follow_up = sim.stats.bodies[1]["messages"][-1]["content"]
    assert "required JSON schema" in follow_up and "tags" in follow_up


def test_a_json_caption_that_fits_the_schema_passes_without_a_reask(
        caption: Any, sim: SimThread, tmp_path: Path) -> None:
    schema = tmp_path / "caption.json"
    schema.write_text(json.dumps({"type": "object", "required": ["caption"]}))
    row = run(caption, sim, "--response-format", "json_object",
              "--quality-json-schema", str(schema))
    assert (row["reasks"], row["quality_flags"], len(sim.stats.bodies)) == (0, [], 1)


def test_a_job_files_quality_table_sets_the_checks(caption: Any, sim: SimThread,
                                                     tmp_path: Path) -> None:
    from pipeline.cli import main

    job = tmp_path / "job.toml"
    manifest = caption.manifest(ROW)
    job.write_text(f'manifest = "{manifest}"\nout = "{tmp_path / "jobout"}"\n'
                   f'[api]\nbase_url = "{sim.base_url}"\n'
                   '[quality]\nmax_words = 5\nreask = false\npolicy = "error"\n')
    assert main(["run", str(job), "--no-progress"]) == 1
    import pandas as pd

    row = pd.read_parquet(tmp_path / "jobout").iloc[0]
    assert (row["status"], row["error_class"], row["reasks"]) == ("error", "quality", 0)
