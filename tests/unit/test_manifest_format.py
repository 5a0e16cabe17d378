"""Specification of pipeline/manifest_format.py and the manifest's one-shot streams:
separators detected from the header, named image and id columns, the hints a
missing column gets, and standard input or a FIFO read once, as it arrives."""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path

import pytest

from pipeline.errors import RunFatal
from pipeline.sources.manifest import Manifest
from pipeline.sources.manifest_format import ManifestFormat, base_dir, is_stream, sniff_delimiter


def write(tmp_path: Path, text: str, name: str = "m.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def fatal(path: Path, fmt: ManifestFormat | None = None) -> str:
    with pytest.raises(RunFatal) as info:
        Manifest(path, fmt)
    assert info.value.exit_code == 2
    return info.value.message


# --------------------------------------------------------------------------- separators


@pytest.mark.parametrize("header,sep", [
    ("id,image,split", ","), ("id;image;split", ";"), ("id\timage\tsplit", "\t"),
    ("id|image|split", "|"), ("image", ","),
    ('id;image;"note, with comma"', ";"),       # a quoted comma does not win
    ("id,image;kind", ","),                      # the image column decides
])
def test_the_separator_is_the_one_that_splits_the_header(header, sep) -> None:
    assert sniff_delimiter(header) == sep


def test_rows_are_split_with_the_detected_separator(tmp_path) -> None:
    m = Manifest(write(tmp_path, 'id;image;note\nr1;a.png;"x; y"\nr2;b.png;z\n'))
    got = [(r.id, r.image, r.extra["note"]) for r in m]
    assert got == [("r1", "a.png", "x; y"), ("r2", "b.png", "z")]


def test_a_given_separator_wins_over_detection(tmp_path) -> None:
    path = write(tmp_path, "image\nphotos/a,b.png\n")  # one column: detection says ','
    assert [r.error is not None for r in Manifest(path)] == [True]
    assert [r.image for r in Manifest(path, ManifestFormat("|"))] == ["photos/a,b.png"]


@pytest.mark.parametrize("word", ["tab", "\\t", "\t"])
def test_tab_can_be_named_as_a_word(word) -> None:
    assert ManifestFormat.parse(word, "image", "id").delimiter == "\t"


@pytest.mark.parametrize("bad", ["", ";;", '"', "\n"])
def test_a_separator_that_cannot_work_is_exit_2(bad) -> None:
    with pytest.raises(RunFatal) as info:
        ManifestFormat.parse(bad, "image", "id")
    assert info.value.exit_code == 2 and "--delimiter" in info.value.message


def test_one_column_as_image_and_id_is_refused() -> None:
    with pytest.raises(RunFatal):
        ManifestFormat.parse(None, "path", "path")


# --------------------------------------------------------------------------- columns


def test_named_columns_are_the_image_and_the_id(tmp_path) -> None:
    m = Manifest(write(tmp_path, "uid,file,image\nu1,a.png,old\n"),
                 ManifestFormat(None, "file", "uid"))
    (row,) = list(m)
    assert (row.id, row.image) == ("u1", "a.png")
    assert row.extra == {"manifest_image": "old"}   # the other 'image' is kept, renamed


@pytest.mark.parametrize("header,first,fix", [
    ("id,image_path,label", "1,a.png,x", "'image_path' looks like image paths or URLs: "
                                          "pass --image-column image_path"),
    ("id,src,label", "1,http://h/x,y", "pass --image-column src"),
    ("id,link,label", "1,https://h/a.webp,x", "pass --image-column link"),   # by value
    ("id,path,url", "1,a.png,http://h/a", "'path', 'url' look like image references"),
    ("id,label", "1,x", "name the column of image paths or URLs 'image', or pass "
                        "--image-column NAME"),
])
def test_a_missing_image_column_names_the_likely_ones(tmp_path, header, first, fix) -> None:
    message = fatal(write(tmp_path, f"{header}\n{first}\n"))
    assert "no 'image' column" in message and fix in message, message


def test_a_missing_named_id_column_suggests_the_closest(tmp_path) -> None:
    message = fatal(write(tmp_path, "uid,image\n1,a.png\n"), ManifestFormat(None, "image", "uuid"))
    assert "did you mean --id-column uid?" in message


# --------------------------------------------------------------------------- streams


def test_standard_input_is_read_once_as_it_arrives(monkeypatch) -> None:
    """The first row is there while the writer is still writing: nothing waits for
    (or holds) the whole input."""
    r, w = os.pipe()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.FileIO(r, "rb")))
    writer = os.fdopen(w, "wb", buffering=0)
    writer.write(b"id,image\nr1,a.png\n")
    m = Manifest(Path("-"))
    assert m.one_shot
    rows = iter(m)
    assert next(rows).id == "r1"            # the writer has not closed the pipe yet
    done = threading.Event()

    def rest() -> None:
        writer.write(b"r2,b.png\n")
        writer.close()
        done.set()

    threading.Thread(target=rest).start()
    assert [row.id for row in rows] == ["r2"]
    assert done.wait(5)
    with pytest.raises(RuntimeError, match="read only once"):
        next(iter(m))


def test_standard_input_that_is_a_terminal_says_to_pipe_the_csv(monkeypatch) -> None:
    master, slave = os.openpty()
    try:
        monkeypatch.setattr(sys, "stdin", os.fdopen(slave, "r", closefd=False))
        message = fatal(Path("-"))
        assert "terminal" in message and "cat m.csv |" in message
    finally:
        os.close(master)
        os.close(slave)


def test_a_fifo_manifest_is_read_through_one_handle(tmp_path) -> None:
    fifo = tmp_path / "m.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(b"id,image\nr1,a.png\nr2,b.png\n")

    t = threading.Thread(target=feed)
    t.start()
    m = Manifest(fifo)
    assert is_stream(fifo) and m.one_shot
    assert [r.id for r in m] == ["r1", "r2"]
    t.join(5)


def test_relative_images_of_stdin_resolve_from_the_current_folder(tmp_path) -> None:
    assert base_dir(Path("-")) == Path.cwd()
    assert base_dir(Path("/dev/fd/63")) == Path.cwd()
    assert base_dir(tmp_path / "m.csv") == tmp_path
