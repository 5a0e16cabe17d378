"""A broken record is an error row naming its file and position; the others caption."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from pipeline.simulator.thread import SimThread

from .helpers import (
    caption,
    rows,
    sample_images,
    tar_member,
    write_folder,
    write_parquet,
    write_shard,
)

IMAGES = sample_images(3)


def _split(out: Path) -> tuple[dict[str, dict], dict[str, dict]]:  # type: ignore[type-arg]
    got = rows(out)
    ok = {r["id"]: r for r in got if r["status"] == "ok"}
    bad = {r["id"]: r for r in got if r["status"] == "error"}
    return ok, bad


def test_a_bad_jsonl_line_is_an_error_row_naming_its_line(tmp_path: Path,
                                                          sim: SimThread) -> None:
    write_folder(tmp_path / "imgs", IMAGES, captions=False)
    lines = [f'{{"image": "imgs/{IMAGES[0].name}", "id": "a"}}',
             '{"image": "imgs/x.png", "id": "b"',          # cut short: not JSON
             '["a list", "not an object"]',
             '{"id": "d", "image": 42}',
             f'{{"image": "imgs/{IMAGES[1].name}", "id": "e"}}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    assert caption(sim, tmp_path / "m.jsonl", tmp_path / "out") == 1
    ok, bad = _split(tmp_path / "out")
    assert sorted(ok) == ["a", "e"]
    assert sorted(bad) == ["d", "line-2", "line-3"]
    assert bad["line-2"]["error"].startswith("manifest line 2: not JSON")
    assert bad["line-3"]["error"] == "manifest line 3: a JSON list, not an object"
    assert bad["d"]["error"] == "manifest line 4: the 'image' field is a int, not a string"
    assert {r["error_class"] for r in bad.values()} == {"bad_input"}


def test_a_null_image_struct_is_an_error_row_naming_file_and_row(tmp_path: Path,
                                                                 sim: SimThread) -> None:
    src = write_parquet(tmp_path / "hf.parquet", IMAGES, embedded=True, nulls=[1])
    assert caption(sim, src, tmp_path / "out") == 1
    ok, bad = _split(tmp_path / "out")
    assert sorted(ok) == sorted([IMAGES[0].name, IMAGES[2].name])
    (row,) = bad.values()
    assert row["id"] == IMAGES[1].name and row["line"] == 2
    assert row["error"] == f"{src} row 2: the image is null"


def test_an_unreadable_file_in_a_folder_is_an_error_row_naming_it(tmp_path: Path,
                                                                  sim: SimThread) -> None:
    folder = write_folder(tmp_path / "photos", IMAGES, captions=False)
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # listed, cannot be opened
    (folder / "broken.jpg").write_bytes(IMAGES[0].data[:200])  # an image, cut short
    assert caption(sim, folder, tmp_path / "out") == 1
    ok, bad = _split(tmp_path / "out")
    assert sorted(ok) == sorted(im.name for im in IMAGES)
    assert sorted(bad) == ["broken.jpg", "gone.jpg"]
    assert bad["gone.jpg"]["error"] == \
        f"{folder}/gone.jpg: cannot be read (No such file or directory)"
    assert bad["broken.jpg"]["error_class"] == "bad_image"


def _truncated_shard(path: Path) -> Path:
    """Two good samples, then a member whose data stops half way (the file ends)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for im in IMAGES[:2]:
            tar_member(tf, im.name, im.data)
        tar_member(tf, IMAGES[2].name, IMAGES[2].data)
    whole = buf.getvalue()
    cut = whole.index(IMAGES[2].data[:64]) + len(IMAGES[2].data) // 2
    path.write_bytes(whole[:cut])
    return path


def test_a_truncated_tar_member_is_an_error_row_and_the_other_shards_go_on(
        tmp_path: Path, sim: SimThread) -> None:
    _truncated_shard(tmp_path / "00000.tar")
    extra = sample_images(5)[3:]
    write_shard(tmp_path / "00001.tar", extra)
    assert caption(sim, f"{tmp_path}/{{00000..00001}}.tar", tmp_path / "out") == 1
    ok, bad = _split(tmp_path / "out")
    assert sorted(ok) == sorted([im.stem for im in IMAGES[:2]] + [im.stem for im in extra])
    (row,) = bad.values()
    assert row["id"] == IMAGES[2].stem and row["line"] == 3
    assert row["error"].startswith(f"{tmp_path}/00000.tar sample 3 ({IMAGES[2].stem!r}): "
                                   f"member {IMAGES[2].name!r} truncated")
    assert row["error"].endswith("the rest of the shard cannot be read")


def test_a_sample_without_an_image_and_a_missing_shard_are_error_rows(
        tmp_path: Path, sim: SimThread) -> None:
    with tarfile.open(tmp_path / "00000.tar", "w") as tf:
        tar_member(tf, "lonely.json", b'{"tag": "no picture"}')
        tar_member(tf, IMAGES[0].name, IMAGES[0].data)
    assert caption(sim, f"{tmp_path}/{{00000..00001}}.tar", tmp_path / "out") == 1
    ok, bad = _split(tmp_path / "out")
    assert sorted(ok) == [IMAGES[0].stem]
    assert bad["lonely"]["error"] == \
        f"{tmp_path}/00000.tar sample 1 ('lonely'): no image member (found lonely.json)"
    assert bad["00001.tar#unreadable"]["error"] == \
        f"shard {tmp_path}/00001.tar: cannot be read (not found)"
