"""Specification of pipeline/manifest.py: the CSV manifest, streamed one record at a time.

A manifest that cannot be read at all is a ``RunFatal`` with exit code 2 naming the
file; any single bad line only becomes an error row (with its physical line number)
and the lines after it are still read.
"""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest

from pipeline.errors import RunFatal
from pipeline.records import output_schema
from pipeline.sources.manifest import Manifest, derive_id

SAMPLE_PNG = Path(__file__).resolve().parents[2] / "data" / "sample" / "horse.png"


def write(tmp_path: Path, data: bytes | str, name: str = "images.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return p


def rows(tmp_path: Path, data: bytes | str) -> list:
    return list(Manifest(write(tmp_path, data)))


def fatal(path: Path) -> RunFatal:
    with pytest.raises(RunFatal) as info:
        Manifest(path)
    return info.value


# --------------------------------------------------------------------------- header errors


def test_missing_file_is_fatal_exit_2_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    e = fatal(path)
    assert e.exit_code == 2
    assert e.error_class == "manifest"
    assert str(path) in e.message
    assert "not found" in e.message


def test_empty_file_is_fatal_exit_2_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"")
    e = fatal(path)
    assert e.exit_code == 2 and str(path) in e.message and "empty" in e.message


def test_blank_first_line_counts_as_empty_file(tmp_path: Path) -> None:
    e = fatal(write(tmp_path, "\n\nimage\na.png\n"))
    assert e.exit_code == 2 and "empty" in e.message


def test_header_without_image_column_is_fatal_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "id,path,prompt\nr1,a.png,hi\n")
    e = fatal(path)
    assert e.exit_code == 2
    assert str(path) in e.message
    assert "'image'" in e.message and "'path'" in e.message  # says what was found


def test_duplicate_column_names_are_fatal_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "id,image,note,note\nr1,a.png,x,y\n")
    e = fatal(path)
    assert e.exit_code == 2 and str(path) in e.message and "note" in e.message


def test_binary_file_is_fatal_exit_2_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, SAMPLE_PNG.read_bytes(), name="oops.csv")
    e = fatal(path)
    assert e.exit_code == 2
    assert str(path) in e.message
    assert "UTF-8" in e.message


def test_directory_instead_of_file_is_fatal_exit_2(tmp_path: Path) -> None:
    e = fatal(tmp_path)
    assert e.exit_code == 2 and str(tmp_path) in e.message


def test_utf8_bom_and_padded_header_names_are_accepted(tmp_path: Path) -> None:
    m = Manifest(write(tmp_path, b"\xef\xbb\xbfid , image ,source\nr1,a.png,x\n"))
    assert m.columns == ["id", "image", "source"]
    assert [r.image for r in m] == ["a.png"]


# --------------------------------------------------------------------------- rows


def test_id_column_value_is_the_row_id(tmp_path: Path) -> None:
    (r,) = rows(tmp_path, "id,image\nhorse-1,horse.png\n")
    assert r.id == "horse-1" and r.image == "horse.png" and r.error is None


def test_derived_id_without_id_column_is_stable_per_image(tmp_path: Path) -> None:
    a = rows(tmp_path, "image\nx/a.png\nx/b.png\n")
    (tmp_path / "images.csv").unlink()
    b = rows(tmp_path, "image,extra\nx/b.png,1\nx/a.png,2\n")  # other order, other columns
    assert {r.image: r.id for r in a} == {r.image: r.id for r in b}
    assert a[0].id != a[1].id
    assert a[0].id == derive_id("x/a.png")
    assert a[0].id.startswith("img-")


def test_blank_id_cell_falls_back_to_derived_id(tmp_path: Path) -> None:
    (r,) = rows(tmp_path, "id,image\n  ,a.png\n")
    assert r.id == derive_id("a.png")


def test_prompt_column_overrides_the_default_prompt(tmp_path: Path) -> None:
    a, b = rows(tmp_path, "image,prompt\na.png,Describe the horse.\nb.png,\n")
    assert a.prompt == "Describe the horse."
    assert b.prompt is None  # empty cell: use the run's prompt


def test_extra_columns_are_carried_on_the_row(tmp_path: Path) -> None:
    m = Manifest(write(tmp_path, "id,image,source,license\nr1,a.png,NASA,CC0\n"))
    (r,) = list(m)
    assert r.extra == {"source": "NASA", "license": "CC0"}
    assert m.extra_columns == ["source", "license"]


def test_extra_column_named_like_an_output_column_is_renamed(tmp_path: Path) -> None:
    m = Manifest(write(tmp_path, "image,status,caption\na.png,todo,old caption\n"))
    (r,) = list(m)
    assert r.extra == {"manifest_status": "todo", "manifest_caption": "old caption"}
    assert m.extra_columns == ["manifest_status", "manifest_caption"]
    schema = output_schema(m.extra_columns)
    assert "manifest_status" in schema.names and schema.names.count("status") == 1


@pytest.mark.parametrize("header", ["image,status,manifest_status", "image,manifest_status,status"])
def test_renamed_extra_column_clashing_with_another_column_is_fatal_exit_2(
        tmp_path: Path, header: str) -> None:
    # 'status' would be stored as 'manifest_status', overwriting the manifest's own column.
    path = write(tmp_path, f"{header}\na.png,x,y\n")
    e = fatal(path)
    assert e.exit_code == 2 and e.error_class == "manifest"
    assert str(path) in e.message
    assert "'status'" in e.message and "'manifest_status'" in e.message


def test_line_numbers_are_physical_file_lines(tmp_path: Path) -> None:
    rs = rows(tmp_path, "image\na.png\n\nb.png\n")
    assert [(r.image, r.line) for r in rs] == [("a.png", 2), ("b.png", 4)]


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    assert [r.image for r in rows(tmp_path, "image\n\n   \na.png\n\n")] == ["a.png"]


def test_crlf_line_endings(tmp_path: Path) -> None:
    rs = rows(tmp_path, "id,image\r\nr1,a.png\r\nr2,b.png\r\n")
    assert [(r.id, r.image, r.error) for r in rs] == [("r1", "a.png", None),
                                                     ("r2", "b.png", None)]


def test_last_line_without_newline_is_read(tmp_path: Path) -> None:
    assert [r.image for r in rows(tmp_path, "image\na.png\nb.png")] == ["a.png", "b.png"]


def test_empty_image_cell_is_an_error_row(tmp_path: Path) -> None:
    (r,) = rows(tmp_path, "image,note\n,hello\n")
    assert r.error is not None and "empty image" in r.error
    assert r.id == "line-2"


@pytest.mark.parametrize("ref, scheme", [
    ("ftp://example.com/a.png", "ftp"),
    ("file:///etc/passwd", "file"),
    ("s3://bucket/key.png", "s3"),
])
def test_unsupported_url_scheme_is_an_error_row(tmp_path: Path, ref: str, scheme: str) -> None:
    (r,) = rows(tmp_path, f"image\n{ref}\n")
    assert r.error is not None
    assert repr(scheme) in r.error


@pytest.mark.parametrize("ref", ["http://example.com/a.png", "HTTPS://EXAMPLE.COM/A.PNG",
                                 "photos/2024/a.png", "/abs/path/a.png"])
def test_http_urls_and_paths_are_accepted(tmp_path: Path, ref: str) -> None:
    (r,) = rows(tmp_path, f"image\n{ref}\n")
    assert r.error is None and r.image == ref


def test_path_with_spaces(tmp_path: Path) -> None:
    (r,) = rows(tmp_path, "image\nmy photos/summer day.png\n")
    assert r.image == "my photos/summer day.png" and r.error is None


def test_quoted_path_with_commas(tmp_path: Path) -> None:
    (r,) = rows(tmp_path, 'image,note\n"a, b, and c.png",x\n')
    assert r.image == "a, b, and c.png" and r.extra == {"note": "x"} and r.error is None


def test_unicode_path(tmp_path: Path) -> None:
    (r,) = rows(tmp_path, "image\nфото/猫 🐈.png\n")
    assert r.image == "фото/猫 🐈.png" and r.error is None


def test_doubled_quotes_inside_a_quoted_field(tmp_path: Path) -> None:
    (r,) = rows(tmp_path, 'image,note\na.png,"a ""quoted"" word"\n')
    assert r.extra == {"note": 'a "quoted" word'}


def test_quoted_field_with_embedded_newline_is_one_record(tmp_path: Path) -> None:
    rs = rows(tmp_path, 'image,note\na.png,"first line\nsecond line"\nb.png,x\n')
    assert [(r.image, r.line, r.error) for r in rs] == [("a.png", 2, None), ("b.png", 4, None)]
    assert rs[0].extra == {"note": "first line\nsecond line"}


# --------------------------------------------------------------------------- bad lines


def test_non_utf8_line_is_an_error_row_with_its_line_number(tmp_path: Path) -> None:
    rs = rows(tmp_path, b"id,image\nr1,a.png\nr2,caf\xe9.png\nr3,c.png\n")
    assert [r.id for r in rs] == ["r1", "r2", "r3"]
    bad = rs[1]
    assert bad.line == 3
    assert bad.error is not None and "line 3" in bad.error and "UTF-8" in bad.error
    assert [r.error for r in (rs[0], rs[2])] == [None, None]
    assert rs[2].image == "c.png" and rs[2].line == 4


def test_wrong_field_count_is_an_error_row_with_its_line_number(tmp_path: Path) -> None:
    rs = rows(tmp_path, "image,note\na.png\nb.png,x,y\nc.png,ok\n")
    assert [(r.line, r.error is not None) for r in rs] == [(2, True), (3, True), (4, False)]
    assert "line 2" in rs[0].error and "expected 2 fields, found 1" in rs[0].error
    assert "found 3" in rs[1].error
    assert rs[2].image == "c.png"


def test_error_row_keeps_extra_column_names_with_no_values(tmp_path: Path) -> None:
    rs = rows(tmp_path, b"image,source\n\xff.png,x\n")
    assert rs[0].extra == {"source": None}


def test_unclosed_quote_on_last_line_costs_that_line_only(tmp_path: Path) -> None:
    rs = rows(tmp_path, 'image,note\na.png,ok\nb.png,"never closed\n')
    assert [(r.image, r.error) for r in rs][0] == ("a.png", None)
    assert rs[1].line == 3 and "line 3" in rs[1].error and "quote" in rs[1].error
    assert len(rs) == 2


def test_quote_inside_an_unquoted_field_is_a_literal_character(tmp_path: Path) -> None:
    # Python's csv (strict too) keeps a quote that does not open a field as a plain character.
    rs = rows(tmp_path, 'image,note\na.png,5" screen\nb.png,ok\n')
    assert [(r.image, r.line, r.error) for r in rs] == [("a.png", 2, None), ("b.png", 3, None)]
    assert rs[0].extra == {"note": '5" screen'}


def test_unclosed_quote_costs_one_line_only(tmp_path: Path) -> None:
    rs = rows(tmp_path, 'image,note\na.png,"unclosed\nb.png,ok\nc.png,ok\nd.png,ok\n')
    assert rs[0].line == 2 and rs[0].error is not None
    assert [(r.image, r.line, r.error) for r in rs[1:]] == [
        ("b.png", 3, None), ("c.png", 4, None), ("d.png", 5, None)]


def test_unclosed_quote_in_a_manifest_with_ids_never_stops_iteration(tmp_path: Path) -> None:
    rs = rows(tmp_path, 'id,image,note\nr1,a.png,"unclosed\nr2,b.png,ok\nr3,c.png,ok\n')
    assert rs[0].id == "r1" and rs[0].error is not None
    assert [(r.id, r.error) for r in rs[1:]] == [("r2", None), ("r3", None)]


def test_stray_carriage_return_costs_one_line(tmp_path: Path) -> None:
    rs = rows(tmp_path, b"image,note\na\rb.png,x\nc.png,ok\n")
    assert rs[0].line == 2 and rs[0].error is not None and "line 2" in rs[0].error
    assert (rs[1].image, rs[1].error) == ("c.png", None)


def test_stray_carriage_return_in_a_manifest_with_ids_costs_one_line(tmp_path: Path) -> None:
    rs = rows(tmp_path, b"id,image\nr1,a\rb.png\nr2,c.png\n")
    assert rs[0].line == 2 and rs[0].error is not None
    assert (rs[1].id, rs[1].error) == ("r2", None)


def test_stray_quotes_on_consecutive_lines_cost_one_line_each(tmp_path: Path) -> None:
    rs = rows(tmp_path, 'image,note\na.png,5" screen\nb.png,7" tablet\nc.png,ok\n')
    assert [r.line for r in rs] == [2, 3, 4]
    assert (rs[2].image, rs[2].error) == ("c.png", None)


def test_stray_carriage_return_error_names_it(tmp_path: Path) -> None:
    (r,) = rows(tmp_path, b"image,note\na\rb.png,x\n")
    assert "carriage return" in r.error


def test_open_quote_whose_join_is_malformed_costs_one_line(tmp_path: Path) -> None:
    rs = rows(tmp_path, 'image,note\na.png,"x\nb.png,"y"\nc.png,ok\n')
    assert [(r.line, r.error is None) for r in rs] == [(2, False), (3, True), (4, True)]
    assert "quote" in rs[0].error and rs[1].extra == {"note": "y"}


def test_open_quote_whose_join_has_the_wrong_field_count_is_not_joined(tmp_path: Path) -> None:
    rs = rows(tmp_path, 'image,note\na.png,"x\ny",z,extra\nc.png,ok\n')
    assert [(r.line, r.error is None) for r in rs] == [(2, False), (3, False), (4, True)]


def test_crlf_quoted_field_with_embedded_newline_is_one_record(tmp_path: Path) -> None:
    rs = rows(tmp_path, b'id,image,note\r\nr1,a.png,"one\r\ntwo"\r\nr2,b.png,x\r\n')
    assert [(r.id, r.line, r.error) for r in rs] == [("r1", 2, None), ("r2", 4, None)]
    assert rs[0].extra == {"note": "one\r\ntwo"}


def test_over_long_line_is_an_error_row_and_is_not_held(tmp_path: Path) -> None:
    rs = rows(tmp_path, b"image\n" + b"x" * (3 << 20) + b"\nb.png\n")
    assert [(r.line, r.error is None) for r in rs] == [(2, False), (3, True)]
    assert "longer than" in rs[0].error and rs[1].image == "b.png"


def test_no_line_content_ever_escapes_the_iterator(tmp_path: Path) -> None:
    rng = random.Random(7)
    alphabet = [b"a", b",", b'"', b"\r", b"\n", b"\xff", b" ", b"r1"]
    for n in range(300):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        rs = list(Manifest(write(tmp_path, b"id,image,note\n" + body, name=f"{n}.csv")))
        lines = [r.line for r in rs]
        assert lines == sorted(set(lines)) and all(r.error or r.image for r in rs)
        assert all(r.id for r in rs)


def test_error_row_keeps_its_id_when_it_can_be_read(tmp_path: Path) -> None:
    rs = rows(tmp_path, b"id,image\nr7,\xfe.png\n")
    assert rs[0].id == "r7" and rs[0].error is not None


def test_error_row_without_readable_id_is_named_after_its_line(tmp_path: Path) -> None:
    rs = rows(tmp_path, "id,image\nr1,a.png,extra,fields\n")
    assert rs[0].id == "line-2"


# --------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def big_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("id,image,source\n")
        f.writelines(f"r{i:06d},images/{i:06d}/photo.png,camera-{i % 7}\n"
                     for i in range(200_000))
    return path


def test_first_rows_of_a_big_manifest_come_without_reading_it_all(big_manifest: Path) -> None:
    assert big_manifest.stat().st_size > 7_000_000
    tracemalloc.start()
    try:
        it = iter(Manifest(big_manifest))
        first = [next(it) for _ in range(10)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.id for r in first] == [f"r{i:06d}" for i in range(10)]
    assert peak < 1_000_000  # far below the file size: it was not read whole


def test_iterating_200k_rows_keeps_memory_flat(big_manifest: Path) -> None:
    tracemalloc.start()
    try:
        n = 0
        last = None
        for row in Manifest(big_manifest):
            n += 1
            last = row
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 200_000
    assert last is not None and last.id == "r199999" and last.line == 200_001
    assert peak < 2_000_000  # a few MB at most; the file itself is ~8 MB
