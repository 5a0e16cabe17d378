"""``export --format webdataset``: the source shards written back with their captions,
read back with the ``webdataset`` library (the consumer's own reader)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.simulator.thread import SimThread

from .helpers import caption

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sources.helpers import sample_images, tar_member, write_shard  # noqa: E402

IMAGES = sample_images(5)


def _shards(tmp: Path) -> str:
    (tmp / "shards").mkdir()
    write_shard(tmp / "shards" / "00000.tar", IMAGES[:3])
    with tarfile.open(tmp / "shards" / "00001.tar", "w") as tf:
        for im in IMAGES[3:]:
            tar_member(tf, f"{im.stem}.png", im.data)
            tar_member(tf, f"{im.stem}.cls", b"7")  # another member: copied as it is
        tar_member(tf, "broken.png", b"not an image")  # a bad_image error row
    return f"{tmp}/shards/{{00000..00001}}.tar"


@pytest.fixture
def captioned(tmp_path: Path, sim: SimThread) -> tuple[str, Path]:
    pattern = _shards(tmp_path)
    caption(sim, Path(pattern), tmp_path / "out",
            "--named-prompt", "short=One line.", "--named-prompt", "tags=Tags.")
    return pattern, tmp_path / "out"


def _read(pattern: str) -> list[dict[str, Any]]:
    import webdataset as wds

    return list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False))


def test_shards_read_back_with_webdataset_hold_the_images_byte_for_byte_and_captions(
        captioned: tuple[str, Path], tmp_path: Path, export: Any) -> None:
    _, out = captioned
    got = export(out, "--format", "webdataset", "--to", tmp_path / "wds", "--trigger", "ohwx")
    assert got.code == 0, got.stderr
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == ["00000.tar", "00001.tar"]
    samples = _read(f"{tmp_path}/wds/{{00000..00001}}.tar")
    assert [s["__key__"] for s in samples] == [im.stem for im in IMAGES]  # source order
    rows = {(r["id"], r["prompt_name"]): r for r in pq.read_table(out).to_pylist()}
    for s, im in zip(samples, IMAGES):
        assert s["png"] == im.data
        short, tags = rows[(im.stem, "short")], rows[(im.stem, "tags")]
        assert s["txt"].decode() == f"ohwx, {short['caption']}"
        assert s["tags.txt"].decode() == f"ohwx, {tags['caption']}"
        meta = json.loads(s["json"])
        assert meta["captioning"]["model"] == short["model"]
        assert meta["captioning"]["usage"]["completion_tokens"] == short["completion_tokens"]
        assert set(meta["captioning"]["prompts"]) == {"short", "tags"}
    assert json.loads(samples[0]["json"])["tag"] == IMAGES[0].tag  # source fields kept
    assert samples[3]["cls"] == b"7"
    assert got.stdout.startswith("export webdataset: 10 rows, 5 written")
    assert "1 samples without an exported caption" in got.stdout


def test_a_key_without_an_ok_row_is_left_out_unless_errors_are_included(
        captioned: tuple[str, Path], tmp_path: Path, export: Any) -> None:
    _, out = captioned
    assert export(out, "--format", "webdataset", "--to", tmp_path / "a").code == 0
    assert "broken" not in {s["__key__"] for s in _read(f"{tmp_path}/a/00001.tar")}
    assert export(out, "--format", "webdataset", "--to", tmp_path / "b",
                  "--include-errors").code == 0
    (broken,) = [s for s in _read(f"{tmp_path}/b/00001.tar") if s["__key__"] == "broken"]
    assert "txt" not in broken and broken["png"] == b"not an image"
    info = json.loads(broken["json"])["captioning"]
    assert info["status"] == "error" and info["error_class"] == "bad_image"


def test_an_out_not_captioned_from_shards_is_one_line_exit_2(tmp_path: Path,
                                                             export: Any, demo: Any) -> None:
    got = export(demo.out, "--format", "webdataset", "--to", tmp_path / "wds")
    assert got.code == 2
    assert "OUT was not captioned from shards" in got.stderr
    assert not (tmp_path / "wds").exists() or not any((tmp_path / "wds").iterdir())


def test_the_written_shards_are_plain_tars_with_no_temporary_files_left(
        captioned: tuple[str, Path], tmp_path: Path, export: Any) -> None:
    _, out = captioned
    assert export(out, "--format", "webdataset", "--to", tmp_path / "wds").code == 0
    names = sorted(p.name for p in (tmp_path / "wds").iterdir())
    assert names == ["00000.tar", "00001.tar"]
    with tarfile.open(tmp_path / "wds" / "00000.tar") as tf:
        first = tf.getmembers()[0]
        assert first.name == f"{IMAGES[0].stem}.png" and first.isfile()
        assert io.BytesIO(tf.extractfile(first).read()).getvalue() == IMAGES[0].data
