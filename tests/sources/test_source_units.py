"""The sources' own rules, without a run: patterns, keys, detection, bounded reads."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.errors import RunFatal
from pipeline.sources.braces import BraceError, expand
from pipeline.sources.choose import detect_kind, open_source, source_base
from pipeline.sources.location import display, join, parent
from pipeline.sources.manifest_format import ManifestFormat
from pipeline.sources.webdataset import sample_key

from .helpers import sample_images, tar_member, write_folder, write_parquet, write_shard

IMAGES = sample_images(3)


def test_a_numeric_brace_range_keeps_its_zero_padding() -> None:
    assert expand("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]


def test_brace_lists_and_ranges_multiply_in_order() -> None:
    assert expand("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]


def test_a_pattern_naming_too_many_shards_is_refused_before_any_list_is_built() -> None:
    with pytest.raises(BraceError, match="more than"):
        expand("{0..99999999}.tar")


def test_a_sample_key_is_the_name_up_to_the_first_dot_of_its_base_name() -> None:
    assert sample_key("a/b.c/000.seg.PNG") == ("a/b.c/000", "seg.png")
    assert sample_key("noext") == ("noext", "")


@pytest.mark.parametrize("name, kind", [
    ("m.csv", "csv"), ("m.tsv", "csv"), ("m.jsonl", "jsonl"), ("m.ndjson", "jsonl"),
    ("m.parquet", "parquet"), ("x.tar", "webdataset"), ("s/{0..9}.tar", "webdataset"),
    ("-", "csv")])
def test_the_kind_comes_from_the_input_form(tmp_path: Path, name: str, kind: str) -> None:
    assert detect_kind(name if name == "-" else str(tmp_path / name), ManifestFormat()) == kind


def test_a_folder_is_a_folder_source_unless_format_says_otherwise(tmp_path: Path) -> None:
    assert detect_kind(tmp_path, ManifestFormat()) == "folder"
    assert detect_kind(tmp_path, ManifestFormat(kind="parquet")) == "parquet"
    assert source_base(tmp_path) == tmp_path
    assert source_base(tmp_path / "m.csv") == tmp_path


def test_a_bad_format_word_is_one_line_exit_2() -> None:
    with pytest.raises(RunFatal, match="--format must be one of") as e:
        ManifestFormat.parse(None, "image", "id", "xml")
    assert e.value.exit_code == 2


def test_a_url_is_shown_without_its_credentials() -> None:
    assert display("s3://key:secret@bucket/m.csv") == "s3://bucket/m.csv"
    assert join("s3://b/dir/", "a/x.jpg") == "s3://b/dir/a/x.jpg"
    assert parent("s3://b/dir/m.csv") == "s3://b/dir"


def test_a_tsv_file_is_read_tab_separated(tmp_path: Path) -> None:
    (tmp_path / "m.tsv").write_text("image\ttag\na.png\tx,y\n")
    (row,) = list(open_source(tmp_path / "m.tsv"))
    assert (row.image, row.extra) == ("a.png", {"tag": "x,y"})


def test_jsonl_columns_are_the_keys_of_the_first_records_and_values_become_text(
        tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "a.png", "n": 3, "tags": ["x", "y"], "ok": True}) + "\n\n"
        + json.dumps({"image": "b.png", "n": None, "id": 7}) + "\n")
    src = open_source(tmp_path / "m.jsonl")
    assert src.extra_columns == ["n", "tags", "ok"]
    a, b = list(src)
    assert a.extra == {"n": "3", "tags": '["x", "y"]', "ok": "true"}
    assert (b.id, b.line, b.extra["n"]) == ("7", 3, None)


def test_a_jsonl_file_without_the_image_field_is_one_line_naming_what_it_found(
        tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"path": "a.png"}\n')
    with pytest.raises(RunFatal, match="no 'image' field .*'path'.*--image-column"):
        open_source(tmp_path / "m.jsonl")


def test_a_parquet_group_with_every_id_done_is_read_without_its_image_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    src_path = write_parquet(tmp_path / "hf.parquet", IMAGES, True, row_group_size=1)
    src = open_source(src_path)
    batches: list[int] = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        batches.extend(kwargs.get("row_groups", []))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    done = {IMAGES[0].name, IMAGES[2].name}
    got = list(src.rows(lambda rid: rid not in done))
    assert batches == [1]  # only the group of the pending row was read whole
    assert [r.data is not None for r in got] == [False, True, False]
    assert [r.id for r in got] == [im.name for im in IMAGES]


def test_binary_parquet_columns_besides_the_image_are_never_carried(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": ["a.png"], "thumb": [b"\x89PNG..."],
                             "note": ["kept"]}), tmp_path / "m.parquet")
    src = open_source(tmp_path / "m.parquet")
    assert src.extra_columns == ["note", "source_file"]


def test_a_fifo_in_a_folder_is_skipped_without_blocking_the_walk(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "f", IMAGES[:1], captions=False)
    os.mkfifo(folder / "pipe.jpg")
    assert [r.id for r in open_source(folder)] == [IMAGES[0].name]


def test_a_finished_folder_image_is_not_opened_again(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "f", IMAGES[:2], captions=False)
    (folder / IMAGES[0].name).unlink()
    (folder / IMAGES[0].name).symlink_to(tmp_path / "gone")  # opening it would fail
    got = list(open_source(folder).rows(lambda rid: rid != IMAGES[0].name))
    assert [(r.id, r.error) for r in got] == [(IMAGES[0].name, None), (IMAGES[1].name, None)]


def test_a_member_over_the_size_cap_is_an_error_row_and_is_not_read(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "a.tar", IMAGES[:2], meta=False)
    src = open_source(shard, max_member=len(IMAGES[0].data) - 1)
    first = next(iter(src))
    assert first.data is None and "(--max-file-bytes)" in (first.error or "")


def test_the_json_fields_of_the_first_samples_are_the_shard_columns(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        tar_member(tf, "k1.jpg", IMAGES[0].data)
        tar_member(tf, "k1.json", b'{"url": "http://x", "status": "success"}')
    src = open_source(tmp_path / "a.tar")
    assert "url" in src.extra_columns and "manifest_status" in src.extra_columns
    (row,) = list(src)
    assert row.extra["manifest_status"] == "success" and row.extra["url"] == "http://x"


@pytest.mark.parametrize("given, stem", [("data/m.csv", "m"), ("s3://b/photos/", "photos"),
                                         ("shards/{00000..00009}.tar", "shards"),
                                         ("x/train-{0..3}.tar", "train"), ("a.jsonl", "a")])
def test_the_default_out_is_named_after_the_input(given: str, stem: str) -> None:
    from pipeline.commands.caption import manifest_stem

    assert manifest_stem(given) == stem
