"""``hf-imagefolder`` and ``hf-parquet``, read back with ``datasets`` itself (offline)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from .helpers import REMOTE, Captioned

datasets = pytest.importorskip("datasets")


def load(kind: str, dest: Path, tmp_path: Path) -> Any:
    return datasets.load_dataset(kind, data_dir=str(dest), split="train",
                                 cache_dir=str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("images", ["copy", "hardlink", "symlink"])
def test_imagefolder_loads_with_an_image_feature_and_the_captions(
        demo: Captioned, export, tmp_path: Path, images: str) -> None:
    dest = tmp_path / "dest"
    r = export(demo.out, "--to", dest, "--format", "hf-imagefolder", "--images", images)
    assert r.code == 0, r.stderr
    ds = load("imagefolder", dest, tmp_path)
    assert isinstance(ds.features["image"], datasets.Image)
    ok = demo.ok()
    assert sorted(ds["id"]) == sorted(i for i in ok if i != "remote")  # a URL: no file
    for ex in ds:
        row = ok[ex["id"]]
        assert ex["caption"] == row["caption"] and ex["captions"] == row["captions"]
        assert ex["image"].size == (row["width"], row["height"])
        assert ex["source"] == row["source"] and ex["model"] == row["model"]
    assert "1 http(s) images (no local file)" in r.stdout


def test_imagefolder_holds_one_example_per_prompt_name(named: Captioned, export,
                                                       tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    export(named.out, "--to", dest, "--format", "hf-imagefolder", "--trigger", "ohwx")
    ds = load("imagefolder", dest, tmp_path)
    got = sorted(zip(ds["id"], ds["prompt_name"], ds["caption"]))
    want = sorted((r["id"], r["prompt_name"], f"ohwx, {r['caption']}")
                  for r in named.rows())
    assert got == want
    assert len(list(dest.glob("*.png")) + list(dest.glob("*.jpg"))) == 8  # placed once


def test_imagefolder_columns_option_chooses_the_metadata(demo: Captioned, export,
                                                         tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    export(demo.out, "--to", dest, "--format", "hf-imagefolder", "--columns",
           "caption,id")
    ds = load("imagefolder", dest, tmp_path)
    assert list(ds.features) == ["image", "caption", "id"]


def test_hf_parquet_embeds_the_image_bytes_and_types_the_columns(
        demo: Captioned, export, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    r = export(demo.out, "--to", dest, "--format", "hf-parquet")
    assert r.code == 0, r.stderr
    ds = load("parquet", dest, tmp_path)
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["finished_at"].dtype.startswith("timestamp[us")
    assert ds.features["width"].dtype == "int32"
    ok = demo.ok()
    assert sorted(ds["id"]) == sorted(ok)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    for ex in raw:
        row = ok[ex["id"]]
        assert ex["caption"] == row["caption"]
        if ex["id"] == "remote":  # kept as a URL: datasets fetches it when decoded
            assert ex["image"] == {"bytes": None, "path": REMOTE}
        else:
            assert ex["image"]["bytes"] == (demo.images / row["image"]).read_bytes()
            assert ex["image"]["path"] == row["image"]
    from PIL import Image

    first = next(ex for ex in raw if ex["id"] == "chelsea")
    assert Image.open(io.BytesIO(first["image"]["bytes"])).size == (451, 300)


def test_hf_parquet_decodes_images_with_datasets(demo: Captioned, export,
                                                 tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    export(demo.out, "--to", dest, "--format", "hf-parquet")
    ds = load("parquet", dest, tmp_path)
    local = ds.select([i for i, rid in enumerate(ds["id"]) if rid != "remote"])
    assert {ex["id"]: ex["image"].size for ex in local}["horse"] == (400, 328)


def test_hf_parquet_starts_new_shards_at_the_shard_size(demo: Captioned, export,
                                                        tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    export(demo.out, "--to", dest, "--format", "hf-parquet", "--shard-size", "1")
    shards = sorted(p.name for p in (dest / "data").iterdir())
    n = len(shards)
    assert n >= 2 and shards == [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    assert sorted(load("parquet", dest, tmp_path)["id"]) == sorted(demo.ok())


def test_hf_parquet_force_replaces_the_earlier_shards(demo: Captioned, export,
                                                      tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    export(demo.out, "--to", dest, "--format", "hf-parquet", "--shard-size", "1")
    r = export(demo.out, "--to", dest, "--format", "hf-parquet", "--force")
    assert r.code == 0
    assert [p.name for p in (dest / "data").iterdir()] == ["train-00000-of-00001.parquet"]
    assert len(load("parquet", dest, tmp_path)) == len(demo.ok())


def test_hf_parquet_skips_and_counts_rows_whose_image_file_is_missing(
        demo: Captioned, export, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    r = export(demo.out, "--to", dest, "--format", "hf-parquet", "--include-errors")
    assert "1 missing or unreadable image files" in r.stdout  # ghost: an error, no file
    assert "ghost.png" in r.stderr
    ds = load("parquet", dest, tmp_path)
    assert set(ds["status"]) == {"ok"} and "error_class" in ds.features
