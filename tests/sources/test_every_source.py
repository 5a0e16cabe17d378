"""The same images give the same captions and keys whatever the source holds them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.simulator.thread import SimThread

from .helpers import (
    caption,
    rows,
    sample_images,
    write_csv,
    write_folder,
    write_jsonl,
    write_parquet,
    write_shard,
)

IMAGES = sample_images(4)
NAMES = sorted(im.name for im in IMAGES)
KEYS = sorted(im.stem for im in IMAGES)


def _by_sha(out: Path) -> dict[str, str]:
    got = rows(out)
    assert all(r["status"] == "ok" for r in got), [r["error"] for r in got]
    return {r["image_sha256"]: r["caption"] for r in got}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, sim: SimThread) -> dict[str, str]:
    """Captions by image hash, from the CSV manifest (today's path)."""
    tmp = tmp_path_factory.mktemp("csv")
    write_folder(tmp / "imgs", IMAGES, captions=False)
    assert caption(sim, write_csv(tmp / "m.csv", IMAGES, "imgs"), tmp / "out") == 0
    return _by_sha(tmp / "out")


def test_jsonl_gives_the_csv_captions_and_ids(tmp_path: Path, sim: SimThread,
                                              reference: dict[str, str]) -> None:
    write_folder(tmp_path / "imgs", IMAGES, captions=False)
    assert caption(sim, write_jsonl(tmp_path / "m.jsonl", IMAGES, "imgs"),
                   tmp_path / "out") == 0
    assert _by_sha(tmp_path / "out") == reference
    got = rows(tmp_path / "out")
    assert sorted(r["id"] for r in got) == NAMES
    assert {r["tag"] for r in got} == {im.tag for im in IMAGES}
    assert sorted(int(r["size"]) for r in got) == sorted(len(im.data) for im in IMAGES)


def test_parquet_of_paths_gives_the_csv_captions_and_ids(
        tmp_path: Path, sim: SimThread, reference: dict[str, str]) -> None:
    write_folder(tmp_path / "imgs", IMAGES, captions=False)
    src = write_parquet(tmp_path / "m.parquet", IMAGES, embedded=False, folder="imgs")
    assert caption(sim, src, tmp_path / "out") == 0
    assert _by_sha(tmp_path / "out") == reference
    got = rows(tmp_path / "out")
    assert sorted(r["id"] for r in got) == NAMES
    assert {r["source_file"] for r in got} == {str(src)}
    assert sorted(r["line"] for r in got) == [1, 2, 3, 4]


def test_parquet_with_embedded_image_structs_never_writes_the_bytes_to_out(
        tmp_path: Path, sim: SimThread, reference: dict[str, str]) -> None:
    import pyarrow.parquet as pq

    src = write_parquet(tmp_path / "hf.parquet", IMAGES, embedded=True, row_group_size=2)
    assert caption(sim, src, tmp_path / "out") == 0
    assert _by_sha(tmp_path / "out") == reference
    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    assert not [f.name for f in schema if "binary" in str(f.type)]
    got = {r["id"]: r for r in rows(tmp_path / "out")}
    assert sorted(got) == NAMES
    assert {r["image"] for r in got.values()} == set(NAMES)  # the struct's path
    assert {r["score"] for r in got.values()} == {"0.0", "0.5", "1.0", "1.5"}
    total = sum(p.stat().st_size for p in (tmp_path / "out").glob("part-*.parquet"))
    assert total < sum(len(im.data) for im in IMAGES) / 4


def test_a_folder_gives_the_csv_captions_with_relative_path_ids(
        tmp_path: Path, sim: SimThread, reference: dict[str, str]) -> None:
    folder = write_folder(tmp_path / "photos", IMAGES)
    (folder / "notes.md").write_text("not an image")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.bin").write_bytes(IMAGES[0].data)  # found by content
    (folder / "sub" / "odd.png").write_text("a text file named like an image")
    assert caption(sim, folder, tmp_path / "out") == 0
    assert _by_sha(tmp_path / "out") == reference
    got = {r["id"]: r for r in rows(tmp_path / "out")}
    assert sorted(got) == sorted([*NAMES, "sub/deep.bin"])
    assert got["sub/deep.bin"]["image"] == "sub/deep.bin"
    for im in IMAGES:
        assert got[im.name]["existing_caption"] == f"old caption of {im.stem}"


def test_a_folder_sidecar_caption_fills_the_prompt_template(tmp_path: Path,
                                                           sim: SimThread) -> None:
    from pipeline.records import prompt_sha256

    folder = write_folder(tmp_path / "photos", IMAGES[:1])
    assert caption(sim, folder, tmp_path / "out",
                   "--prompt", "Improve this caption: {existing_caption}") == 0
    (row,) = rows(tmp_path / "out")
    sent = f"Improve this caption: old caption of {IMAGES[0].stem}"
    assert row["prompt_sha256"] == prompt_sha256(None, sent)


def test_webdataset_shards_by_brace_pattern_give_one_row_per_key(
        tmp_path: Path, sim: SimThread, reference: dict[str, str]) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", IMAGES[:2])
    write_shard(shards / "00001.tar", IMAGES[2:])
    assert caption(sim, f"{shards}/{{00000..00001}}.tar", tmp_path / "out") == 0
    assert _by_sha(tmp_path / "out") == reference
    got = {r["id"]: r for r in rows(tmp_path / "out")}
    assert sorted(got) == KEYS
    first = got[IMAGES[0].stem]
    assert first["source_file"] == f"{shards}/00000.tar"
    assert first["source_member"] == IMAGES[0].name
    assert first["line"] == 1
    assert first["tag"] == IMAGES[0].tag and first["width_hint"] == "1"
    assert first["existing_caption"] == f"alt text of {IMAGES[0].stem}"
    assert first["image"] == f"00000.tar/{IMAGES[0].name}"


def test_a_rerun_of_shards_reads_no_image_of_a_finished_key(
        tmp_path: Path, sim: SimThread, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.sources import webdataset

    shard = write_shard(tmp_path / "00000.tar", IMAGES)
    assert caption(sim, shard, tmp_path / "out", "--limit", "2") == 0
    read: list[str] = []
    real = webdataset._read

    def counting(tf, m):  # type: ignore[no-untyped-def]
        read.append(m.name)
        return real(tf, m)

    monkeypatch.setattr(webdataset, "_read", counting)
    assert caption(sim, shard, tmp_path / "out") == 0
    images = [n for n in read if not n.endswith((".json", ".txt"))]
    assert sorted(images) == sorted(im.name for im in IMAGES[2:])
    assert sorted(r["id"] for r in rows(tmp_path / "out")) == KEYS
