"""The lean tar reader against archives written by Python's own tarfile."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from pipeline.sources import tarstream


def _tar(names: list[str], fmt: int = tarfile.PAX_FORMAT, data: bytes = b"abc") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        tf.addfile(tarfile.TarInfo("folder"), None)  # a non-file entry (size 0, type 0)
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _names(raw: bytes) -> list[tuple[str, bytes]]:
    f = io.BytesIO(raw)
    return [(m.name, tarstream.read(f, m)) for m in tarstream.members(f)]


LONG = "a/" + "x" * 150 + "/000001.jpg"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_names_and_data_match_tarfile_in_every_header_format(fmt: int) -> None:
    names = ["000.jpg", "sub/001.seg.png", LONG if fmt != tarfile.USTAR_FORMAT else "b.txt"]
    got = _names(_tar(names, fmt))
    assert got == [("folder", b""), *((n, b"abc") for n in names)]


def test_a_pax_unicode_name_is_read() -> None:
    assert _names(_tar(["ünïcode/ß.jpg"]))[-1] == ("ünïcode/ß.jpg", b"abc")


def test_an_archive_cut_inside_a_member_is_truncated_even_if_the_data_is_not_read() -> None:
    raw = _tar(["a.jpg"], data=b"x" * 5000)
    cut = raw[: raw.index(b"x" * 100) + 1000]
    with pytest.raises(tarstream.Truncated):
        list(tarstream.members(io.BytesIO(cut)))


def test_a_corrupt_header_is_a_tar_error_naming_its_offset() -> None:
    raw = bytearray(_tar(["a.jpg"]))
    raw[1024 + 10] ^= 0xFF  # inside the third header's name
    with pytest.raises(tarstream.TarError, match="checksum at offset"):
        list(tarstream.members(io.BytesIO(bytes(raw))))


def test_a_gzip_stream_is_read_forward() -> None:
    raw = gzip.compress(_tar(["a.jpg", "b.jpg"]))
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
        got = [(m.name, tarstream.read(f, m)) for m in tarstream.members(f)]
    assert got[-2:] == [("a.jpg", b"abc"), ("b.jpg", b"abc")]
