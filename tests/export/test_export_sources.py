"""Every export from a dataset captioned out of each kind of source (the sources of
pipeline/sources/), read back with the consumer's own reader.

Images embedded in the source (a Parquet image struct, a WebDataset member) are not in
OUT; ``hf-imagefolder`` and ``hf-parquet`` read them out of the source again.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage
from sources.helpers import (
    sample_images,
    write_csv,
    write_folder,
    write_jsonl,
    write_parquet,
    write_shard,
)

from pipeline.simulator.app import SimConfig
from pipeline.simulator.thread import SimThread

datasets = pytest.importorskip("datasets")

KINDS = ("csv", "jsonl", "parquet", "hf-parquet", "folder", "shards")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One OUT per source kind, captioned from the same four sample photos."""
    import os

    from pipeline.cli import main

    os.environ.setdefault("CAPTION_API_KEY", "sk-export-sources")
    work = tmp_path_factory.mktemp("sources")
    images = sample_images(4)
    write_folder(work / "img", images, captions=True)
    sources = {"csv": write_csv(work / "m.csv", images, "img"),
               "jsonl": write_jsonl(work / "m.jsonl", images, "img"),
               "parquet": write_parquet(work / "m.parquet", images, embedded=False,
                                        folder="img"),
               "hf-parquet": write_parquet(work / "hf.parquet", images, embedded=True),
               "folder": work / "img",
               "shards": write_shard(work / "s-00000.tar", images)}
    sim = SimThread(SimConfig(latency=0.0, tokens_per_second=0.0))
    outs = {}
    try:
        for kind, source in sources.items():
            out = work / f"out-{kind}"
            code = main(["caption", str(source), "--out", str(out), "--base-url",
                         sim.base_url, "--no-progress", "--concurrency", "4"])
            assert code == 0, kind
            outs[kind] = out
    finally:
        sim.stop()
    return outs


def captions_of(out: Path) -> dict[str, str]:
    t = pq.read_table(out, columns=["id", "caption", "width", "height"]).to_pylist()
    return {r["caption"]: (r["width"], r["height"]) for r in t}  # type: ignore[misc]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["hf-imagefolder", "hf-parquet"])
def test_hf_exports_of_every_source_load_with_their_images(captioned, export, tmp_path: Path,
                                                         kind: str, fmt: str) -> None:
    dest = tmp_path / "dest"
    r = export(captioned[kind], "--to", dest, "--format", fmt)
    assert r.code == 0, r.stderr
    ds = datasets.load_dataset("imagefolder" if fmt == "hf-imagefolder" else "parquet",
                               data_dir=str(dest), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    sizes = captions_of(captioned[kind])
    assert len(ds) == 4
    for row in ds:
        image = row["image"]
        if not isinstance(image, PILImage.Image):
            image = PILImage.open(io.BytesIO(image["bytes"]))
        assert sizes[row["caption"]] == image.size  # the image the caption was made from


@pytest.mark.parametrize("kind", KINDS)
def test_sidecar_and_jsonl_exports_of_every_source_hold_every_caption(
        captioned, export, tmp_path: Path, kind: str) -> None:
    expected = set(captions_of(captioned[kind]))
    r = export(captioned[kind], "--to", tmp_path / "txt", "--format", "sidecar")
    assert r.code == 0, r.stderr
    sidecars = {p.read_text(encoding="utf-8").strip()
                for p in (tmp_path / "txt").rglob("*.txt")}
    assert sidecars == expected
    r = export(captioned[kind], "--to", tmp_path / "c.jsonl", "--format", "jsonl")
    assert r.code == 0, r.stderr
    lines: list[dict[str, Any]] = [json.loads(ln) for ln in
                                   (tmp_path / "c.jsonl").read_text().splitlines()]
    assert {ln["caption"] for ln in lines} == expected


@pytest.mark.parametrize("damage", ["fifo", "device", "garbage", "gone"])
def test_a_source_shard_that_is_no_longer_a_readable_tar_is_skipped_not_waited_for(
        captioned, tmp_path: Path, damage: str) -> None:
    import os
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "out"
    shutil.copytree(captioned["shards"], out)
    shard = Path(pq.read_table(out, columns=["source_file"])["source_file"][0].as_py())
    saved = tmp_path / "saved.tar"
    shutil.move(shard, saved)
    try:
        if damage == "fifo":
            os.mkfifo(shard)  # opening it would block for ever
        elif damage == "device":
            shard.symlink_to("/dev/zero")  # reading it would never end
        elif damage == "garbage":
            shard.write_bytes(os.urandom(1 << 20))
        proc = subprocess.run([sys.executable, "-m", "pipeline", "export", str(out),
                               "--format", "hf-parquet", "--to", str(tmp_path / "dest"),
                               "--no-progress"], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
    finally:
        shard.unlink(missing_ok=True)
        shutil.move(saved, shard)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    assert "4 rows, 0 written" in said and "skipped: 4 " in said, said
