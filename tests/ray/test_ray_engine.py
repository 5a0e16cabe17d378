"""``--engine ray`` against the real simulator on a local Ray instance (2 CPUs).

(1) the local and the Ray engine caption the same manifest into the same keys, captions,
statuses and schema; (2) a run may switch engines between resumes; (3) a caption actor
killed mid-run loses no row (after a rerun at worst); (4) a fatal API error in an actor
stops the run with exit 3 and writes nothing in flight. Two fast tests need no Ray: the
planner is the local one with stable hashes, and a missing Ray is one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.commands.caption import build_parser, settings_from_args
from pipeline.simulator.app import SimConfig
from pipeline.simulator.thread import SimThread

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted(p for p in (REPO / "data" / "sample").iterdir()
                 if p.suffix in (".png", ".jpg"))
FAST = ["--backoff-base", "0.01", "--backoff-max", "0.05", "--read-timeout", "10",
        "--retries", "2", "--no-progress"]

COMPARED = ["status", "caption", "error", "error_class", "line", "image", "source",
            "manifest_status", "width", "height", "sent_width", "sent_height", "sent_bytes",
            "image_sha256", "finish_reason"]


def make_manifest(tmp: Path, good: int = 34, bad: bool = True) -> Path:
    """``good`` rows over the 8 sample images (each image under several ids), plus an
    http URL, an empty cell, an ftp URL, a missing file, a duplicate id and a line
    with too many fields: 40 lines, 39 keys."""
    imgs = tmp / "imgs"
    imgs.mkdir(exist_ok=True)
    for p in SAMPLES:
        shutil.copy(p, imgs / p.name)
    lines = ["id,image,source,prompt,status"]
    for i in range(good):
        prompt = "Describe the colours of this picture." if i % 10 == 3 else ""
        lines.append(f"r{i:02d},imgs/{SAMPLES[i % len(SAMPLES)].name},sample {i % 3},"
                     f"{prompt},s{i % 2}")
    if bad:
        lines += ["url1,http://img.test/cat.jpg,web,,s0",
                  "bad-empty,,broken,,s1",
                  "bad-scheme,ftp://host/x.png,broken,,s0",
                  "missing,imgs/nope.jpg,broken,,s1",
                  f"r05,imgs/{SAMPLES[0].name},duplicate id,,s0",
                  "x1,imgs/a.png,too,many,fields,here"]
    path = tmp / "images.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def caption_local(manifest: Path, out: Path, base_url: str, *args: str) -> int:
    return cli.main(["caption", str(manifest), "--out", str(out), "--base-url", base_url,
                     *FAST, *args])


def caption_ray(manifest: Path, out: Path, base_url: str, *args: str, actors: int = 2) -> int:
    argv = [str(manifest), "--out", str(out), "--base-url", base_url, *FAST, *args]
    return cli.main(["caption", *argv, "--engine", "ray", "--ray-actors", str(actors)])


def read(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out)
    return df.sort_values(["id", "prompt_name"]).reset_index(drop=True)


def one_row_per_key(df: pd.DataFrame) -> None:
    dups = df[df.duplicated(["id", "prompt_name"], keep=False)]
    assert dups.empty, f"keys written twice: {sorted(set(dups['id']))}"


def runs(out: Path) -> list[dict[str, Any]]:
    import json

    reports = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    return sorted(reports, key=lambda r: r["ended_at"])  # run ids only sort by the second


pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """One local Ray instance (2 CPUs) for the module; the engine joins it."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def simulator() -> Iterator[Callable[..., SimThread]]:
    """``simulator(**SimConfig fields)`` -> a running simulator, stopped after the test."""
    started: list[SimThread] = []

    def make(**config: Any) -> SimThread:
        sim = SimThread(SimConfig(**{"latency": 0.0, "tokens_per_second": 0.0, **config}))
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


# ----------------------------------------------------------------- with Ray


@pytest.mark.ray
def test_both_engines_give_the_same_rows(ray_local: Any, simulator: Any, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    sim = simulator()
    manifest = make_manifest(tmp_path)
    prompts = ["--named-prompt", "short=One short caption.",
               "--named-prompt", "detail=Describe this {source} image in detail."]
    assert caption_local(manifest, tmp_path / "local", sim.base_url, "--concurrency", "4",
                         *prompts) == 1  # the bad rows are error rows
    assert caption_ray(manifest, tmp_path / "ray", sim.base_url, "--concurrency", "4",
                       *prompts) == 1
    dups = [r.getMessage() for r in caplog.records if "duplicate id" in r.getMessage()]
    assert dups == ["manifest line 40: duplicate id 'r05' skipped (first one kept)"] * 2
    local, ray_ = read(tmp_path / "local"), read(tmp_path / "ray")
    one_row_per_key(ray_)
    assert len(local) == 2 * 39
    assert list(zip(local["id"], local["prompt_name"])) == list(zip(ray_["id"],
                                                                    ray_["prompt_name"]))
    pd.testing.assert_frame_equal(local[COMPARED], ray_[COMPARED])
    assert set(local["status"]) == {"ok", "error"} and (local["status"] == "ok").sum() == 70
    # The same Parquet schema, so one dataset may hold parts of both engines.
    schema = {pq.read_schema(p).remove_metadata() for p in (tmp_path / "local").glob("*.parquet")}
    schema |= {pq.read_schema(p).remove_metadata() for p in (tmp_path / "ray").glob("*.parquet")}
    assert len(schema) == 1
    report = runs(tmp_path / "ray")[-1]
    assert report["engine"] == "ray" and report["ray_actors"] == 2
    assert report["ok"] == 70 and report["failed"] == 8 and report["skipped_duplicate"] == 1
    assert set(runs(tmp_path / "local")[-1]) <= set(report)
    assert "api_key" not in report["options"]


@pytest.mark.ray
def test_a_run_may_switch_engines_between_resumes(ray_local: Any, simulator: Any,
                                                  tmp_path: Path) -> None:
    sim = simulator()
    manifest = make_manifest(tmp_path)
    out = tmp_path / "out"
    assert caption_local(manifest, out, sim.base_url, "--limit", "10") == 0
    assert len(read(out)) == 10
    assert caption_ray(manifest, out, sim.base_url) == 1
    df = read(out)
    one_row_per_key(df)
    assert len(df) == 39
    skipped = lambda r: r["skipped_done"] + r["skipped_duplicate"]  # noqa: E731
    ray_report = runs(out)[-1]
    assert ray_report["finished"] == 29 and skipped(ray_report) == 11  # 10 done, 1 dup id
    # ...and back: the local engine finds nothing left to do.
    assert caption_local(manifest, out, sim.base_url) == 0
    local_report = runs(out)[-1]
    assert local_report["finished"] == 0 and skipped(local_report) == 40
    assert len(read(out)) == 39
    # --retry-errors on Ray replaces the error rows, still one row per key.
    caption_ray(manifest, out, sim.base_url, "--retry-errors")
    df = read(out)
    one_row_per_key(df)
    assert len(df) == 39 and runs(out)[-1]["finished"] == 4


def actor_pids() -> list[int]:
    """Processes of the caption actors (Ray titles them after the class)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"CaptionActor" in cmd and cmd.startswith(b"ray::"):
            pids.append(int(proc.name))
    return pids


@pytest.mark.ray
def test_a_killed_actor_loses_no_row(ray_local: Any, simulator: Any, tmp_path: Path) -> None:
    sim = simulator(tokens_per_second=20)  # each caption streams for a second or more
    manifest = make_manifest(tmp_path, good=40, bad=False)
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_one_actor_mid_run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sim.stats.requests_total < 6:
            time.sleep(0.05)
        pids = actor_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_one_actor_mid_run, daemon=True)
    killer.start()
    code = caption_ray(manifest, out, sim.base_url, "--concurrency", "8", "--no-dedupe")
    killer.join(5)
    assert killed, "no caption actor was found to kill"
    if code != 0:  # the run may fail; a rerun must then fill the gap
        code = caption_ray(manifest, out, sim.base_url, "--concurrency", "8", "--no-dedupe")
    assert code == 0
    df = read(out)
    one_row_per_key(df)
    assert sorted(df["id"]) == [f"r{i:02d}" for i in range(40)]
    assert (df["status"] == "ok").all()


@pytest.mark.ray
def test_a_fatal_error_in_an_actor_stops_the_run(ray_local: Any, simulator: Any,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    from pipeline.simulator.app import INVALID_KEY

    sim = simulator()
    manifest = make_manifest(tmp_path, good=12, bad=False)
    out = tmp_path / "out"
    monkeypatch.setenv("CAPTION_API_KEY", INVALID_KEY)
    assert caption_ray(manifest, out, sim.base_url) == 3
    err = capfd.readouterr().err
    assert "error: authentication failed (HTTP 401" in err
    assert INVALID_KEY not in err
    assert not list(out.glob("*.parquet"))  # nothing in flight was written
    assert runs(out)[-1]["exit_code"] == 3
    monkeypatch.undo()
    monkeypatch.setenv("CAPTION_API_KEY", "sk-test-key-0042")
    assert caption_ray(manifest, out, sim.base_url) == 0  # the lock was released
    assert len(read(out)) == 12


@pytest.mark.ray
def test_a_job_file_selects_the_ray_engine(ray_local: Any, simulator: Any,
                                           tmp_path: Path) -> None:
    sim = simulator()
    make_manifest(tmp_path, good=6, bad=False)
    job = tmp_path / "job.toml"
    job.write_text(f'manifest = "images.csv"\nout = "out"\nengine = "ray"\n'
                   f'[api]\nbase_url = "{sim.base_url}"\n[ray]\nactors = 1\n')
    assert cli.main(["run", str(job), "--no-progress"]) == 0
    assert len(read(tmp_path / "out")) == 6
    assert runs(tmp_path / "out")[-1]["engine"] == "ray"


# ----------------------------------------------------------------- without Ray


def test_the_planning_task_runs_the_one_planner_over_shipped_keys(tmp_path: Path) -> None:
    import pickle

    from pipeline.engines.ray_actor import plan_chunks
    from pipeline.keys import KeySet, key_hash
    from pipeline.sources.manifest import Manifest
    from pipeline.sources.plan import NamedPrompt, Plan

    path = make_manifest(tmp_path)
    prompts = (NamedPrompt("a", "Caption {source}."), NamedPrompt("default", "Caption."))
    done = KeySet()
    for k in [("r01", "a"), ("r02", "default"), ("r03", "a"), ("r03", "default")]:
        done.add(key_hash(*k))
    local = Plan(Manifest(path), done, prompts, 50)
    expected = [row for group in local for row in group]

    import types

    # ray.get of the shipped reference gives the driver's array back: ray is not needed
    # to plan, only to move the array.
    sys.modules["ray"] = types.SimpleNamespace(get=lambda ref: ref)  # type: ignore[assignment]
    try:
        chunks = list(plan_chunks(None, manifest=str(path), fmt=Manifest(path).fmt,
                                  prompts=prompts, limit=50, done=[done.sorted_array()],
                                  chunk_rows=8))
    finally:
        del sys.modules["ray"]
    got = [row for c in chunks if c["kind"][0].as_py() == "rows"
           for row in pickle.loads(c["payload"][0].as_py())]
    stats = json.loads(chunks[-1]["payload"][0].as_py())
    assert got == expected
    assert (stats["skipped_done"], stats["skipped_duplicate"], stats["pending"]) == (
        local.counts.skipped_done, local.counts.skipped_duplicate, 50)


def test_without_ray_the_engine_says_how_to_get_it(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from pipeline.engines.ray_driver import RayEngine
    from pipeline.run.session import RunSession

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    settings = settings_from_args(build_parser().parse_args(
        [str(make_manifest(tmp_path, good=2, bad=False)), "--out", str(tmp_path / "out"),
         "--base-url", "http://127.0.0.1:9/v1"]))
    result = asyncio.run(RunSession(settings, RayEngine()).execute())
    assert result.exit_code == 2
    assert result.fatal == "--engine ray needs Ray: pip install 'caption-pipeline[ray]'"


@pytest.mark.ray
def test_each_actor_runs_the_quality_gate_and_its_reask(ray_local: Any, simulator: Any,
                                                       tmp_path: Path) -> None:
    sim = simulator()
    manifest = make_manifest(tmp_path, good=8, bad=False)
    out = tmp_path / "ray"
    assert caption_ray(manifest, out, sim.base_url, "--no-dedupe", "--prompt",
                       "Describe the image. [soft-refuse]") == 0
    df = read(out)
    one_row_per_key(df)
    # r03 has a prompt of its own in the manifest (no trigger): it is not re-asked
    asked = df[df["id"] != "r03"]
    assert (df["status"] == "ok").all() and (asked["reasks"] == 1).all()
    assert df.loc[df["id"] == "r03", "reasks"].tolist() == [0]
    assert [list(f) for f in asked["reask_flags"]] == [["refusal"]] * 7
    assert all(len(f) == 0 for f in df["quality_flags"])
