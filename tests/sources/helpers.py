"""Fixtures built in the test: the same real images as CSV, JSONL, Parquet (paths and
Hugging Face image structs), a folder with sidecar captions, and WebDataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.simulator.thread import SimThread

REPO = Path(__file__).resolve().parents[2]
# The shared sample images beside the repository when present (a developer's machine,
# CI), else the copies the demo ships.
SHARED = REPO.parent / "shared" / "sample-images"
SAMPLES = SHARED if SHARED.is_dir() else REPO / "data" / "sample"
API_KEY = "sk-sources-tests"
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@dataclass(frozen=True)
class Image:
    stem: str   # the WebDataset key and the folder's file stem
    name: str   # file name (stem + extension)
    data: bytes
    tag: str    # an extra column every source carries


def sample_images(n: int = 4) -> list[Image]:
    files = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg"))[:n]
    return [Image(p.stem, p.name, p.read_bytes(), f"tag-{p.stem}") for p in files]


def write_folder(root: Path, images: Iterable[Image], captions: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for im in images:
        (root / im.name).write_bytes(im.data)
        if captions:
            (root / f"{im.stem}.txt").write_text(f"old caption of {im.stem}\n")
    return root


def write_csv(path: Path, images: Iterable[Image], folder: str) -> Path:
    lines = ["id,image,tag"] + [f"{im.name},{folder}/{im.name},{im.tag}" for im in images]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, images: Iterable[Image], folder: str) -> Path:
    with path.open("w") as f:
        for im in images:
            f.write(json.dumps({"id": im.name, "image": f"{folder}/{im.name}", "tag": im.tag,
                                "size": len(im.data)}) + "\n")
    return path


def write_parquet(path: Path, images: list[Image], embedded: bool, folder: str = "",
                  row_group_size: int | None = None, nulls: Iterable[int] = ()) -> Path:
    blank = set(nulls)
    if embedded:
        column = pa.array([None if i in blank else {"bytes": im.data, "path": im.name}
                           for i, im in enumerate(images)], HF_IMAGE)
    else:
        column = pa.array([f"{folder}/{im.name}" for im in images])
    table = pa.table({"id": [im.name for im in images], "image": column,
                      "tag": [im.tag for im in images],
                      "score": [float(i) / 2 for i in range(len(images))]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, images: Iterable[Image], meta: bool = True) -> Path:
    with tarfile.open(path, "w") as tf:
        for im in images:
            ext = im.name.rsplit(".", 1)[1]
            tar_member(tf, f"{im.stem}.{ext}", im.data)
            if meta:
                tar_member(tf, f"{im.stem}.json",
                           json.dumps({"tag": im.tag, "width_hint": 1}).encode())
                tar_member(tf, f"{im.stem}.txt", f"alt text of {im.stem}".encode())
    return path


def caption(sim: SimThread, source: Path | str, out: Path, *args: str) -> int:
    """``python -m pipeline caption`` in-process against the simulator."""
    from pipeline.cli import main

    return main(["caption", str(source), "--out", str(out), "--base-url", sim.base_url,
                 "--no-progress", "--retries", "0", "--concurrency", "4", *args])


def rows(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out).to_pylist()
