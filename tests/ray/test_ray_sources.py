"""``--engine ray`` reads the same sources as the local engine, planned by the same code:
WebDataset shards and a Parquet file of embedded Hugging Face image structs give the
same keys, captions and provenance columns on both engines. One fast test needs no
Ray: the planning task's function yields the source's rows, image bytes included."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline import cli
from pipeline.simulator.app import SimConfig
from pipeline.simulator.thread import SimThread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sources.helpers import sample_images, write_parquet, write_shard  # noqa: E402

FAST = ["--backoff-base", "0.01", "--backoff-max", "0.05", "--read-timeout", "10",
        "--retries", "2", "--no-progress", "--concurrency", "4"]
COMPARED = ["id", "status", "caption", "image", "line", "source_file", "source_member",
            "existing_caption", "tag", "image_sha256", "sent_width", "sent_height"]
IMAGES = sample_images(6)

pytestmark = pytest.mark.timeout(120)


def _shards(tmp: Path) -> str:
    (tmp / "shards").mkdir()
    write_shard(tmp / "shards" / "00000.tar", IMAGES[:3])
    write_shard(tmp / "shards" / "00001.tar", IMAGES[3:])
    return f"{tmp}/shards/{{00000..00001}}.tar"


def test_the_ray_planning_task_yields_the_source_rows_with_their_images(
        tmp_path: Path) -> None:
    from pipeline.engines.ray_actor import plan_chunks
    from pipeline.sources.manifest_format import ManifestFormat
    from pipeline.sources.plan import NamedPrompt

    chunks = list(plan_chunks(None, manifest=_shards(tmp_path), fmt=ManifestFormat(),
                              prompts=(NamedPrompt("default", "Describe."),), limit=None,
                              done=[], chunk_rows=4))
    rows = [r for c in chunks if c["kind"][0].as_py() == "rows"
            for r in pickle.loads(c["payload"][0].as_py())]
    assert [r.id for r in rows] == [im.stem for im in IMAGES]
    assert [r.data for r in rows] == [im.data for im in IMAGES]
    assert rows[3].extra["source_file"] == f"{tmp_path}/shards/00001.tar"


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimThread]:
    s = SimThread(SimConfig(latency=0.0, tokens_per_second=0.0))
    yield s
    s.stop()


def _both(source: str, tmp: Path, sim: SimThread, *args: str) -> tuple[pd.DataFrame, ...]:
    frames = []
    for engine in ("local", "ray"):
        out = tmp / engine
        argv = ["caption", source, "--out", str(out), "--base-url", sim.base_url, *FAST,
                *args, "--engine", engine]
        if engine == "ray":
            argv += ["--ray-actors", "2"]
        assert cli.main(argv) == 0
        df = pd.read_parquet(out).sort_values("id").reset_index(drop=True)
        frames.append(df[[c for c in COMPARED if c in df.columns]])
    return tuple(frames)


@pytest.mark.ray
def test_webdataset_shards_give_the_same_rows_on_both_engines(
        ray_local: Any, sim: SimThread, tmp_path: Path) -> None:
    local, ray = _both(_shards(tmp_path), tmp_path, sim)
    assert len(local) == len(IMAGES)
    pd.testing.assert_frame_equal(local, ray)


@pytest.mark.ray
def test_parquet_image_structs_give_the_same_rows_on_both_engines(
        ray_local: Any, sim: SimThread, tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "hf.parquet", IMAGES, embedded=True, row_group_size=2)
    local, ray = _both(str(src), tmp_path, sim)
    assert (local["status"] == "ok").all() and len(local) == len(IMAGES)
    pd.testing.assert_frame_equal(local, ray)
