"""Specification of pipeline/images.py: what is sent for a manifest row's ``image``.

Local files become ``data:`` URIs whose media type comes from the bytes, never the
extension; an image that fits is sent byte for byte, anything else (a format the
providers refuse, too large in pixels or in base64 bytes) is converted by
``imageprep`` (specified in detail in test_imageprep.py). URLs pass through untouched
unless a fetcher (``--fetch-urls``) downloads them. Every local problem is a
``RowFailed`` with class ``bad_image`` and a message a person can act on (it names
the file or URL).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
from PIL import Image

from pipeline.errors import RowFailed
from pipeline.images import load as images_module
from pipeline.images.load import ImageSource, ReadLimits, _read_capped, b64_len, sniff_mime
from pipeline.images.pool import DaemonPool
from pipeline.images.prepare import ImagePolicy
from pipeline.records import ManifestRow, PreparedImage

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "sample"
PNG = SAMPLES / "horse.png"
JPG = SAMPLES / "rocket.jpg"
BIG = 50 * 1024 * 1024


def row(image: str) -> ManifestRow:
    return ManifestRow("r1", image, None, 2, {})


async def load(image: str, base: Path = SAMPLES, limit: int = BIG) -> PreparedImage:
    return await ImageSource(base, ImagePolicy(max_bytes=limit)).load(row(image))


async def failure(image: str, base: Path, limit: int = BIG) -> RowFailed:
    with pytest.raises(RowFailed) as info:
        await load(image, base, limit)
    assert info.value.error_class == "bad_image"
    return info.value


def decode(uri: str) -> tuple[str, bytes]:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:") and head.endswith(";base64")
    return head[5:-7], base64.b64decode(payload, validate=True)


def pillow_file(path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return path


# --------------------------------------------------------------------------- accepted images


async def test_png_becomes_a_png_data_uri_with_the_exact_bytes() -> None:
    img = await load("horse.png")
    mime, data = decode(img.url)
    assert mime == "image/png" and img.mime == "image/png"
    assert data == PNG.read_bytes()
    assert img.sent_bytes == PNG.stat().st_size


async def test_local_image_reports_its_pixel_size() -> None:
    img = await load("horse.png")
    with Image.open(PNG) as im:
        assert (img.width, img.height) == im.size


async def test_jpg_becomes_a_jpeg_data_uri_never_image_jpg() -> None:
    img = await load("rocket.jpg")
    assert img.url.startswith("data:image/jpeg;base64,")
    assert decode(img.url)[1] == JPG.read_bytes()


async def test_media_type_is_sniffed_when_a_png_is_renamed_jpg(tmp_path: Path) -> None:
    shutil.copy(PNG, tmp_path / "actually-png.jpg")
    img = await load("actually-png.jpg", tmp_path)
    assert img.mime == "image/png" and img.url.startswith("data:image/png;base64,")


async def test_media_type_is_sniffed_when_a_jpeg_has_no_or_wrong_extension(
        tmp_path: Path) -> None:
    shutil.copy(JPG, tmp_path / "photo.png")
    shutil.copy(JPG, tmp_path / "photo")
    assert (await load("photo.png", tmp_path)).mime == "image/jpeg"
    assert (await load("photo", tmp_path)).mime == "image/jpeg"


@pytest.mark.parametrize("fmt, mime", [("GIF", "image/gif"), ("WEBP", "image/webp")])
async def test_gif_and_webp_are_accepted(tmp_path: Path, fmt: str, mime: str) -> None:
    pillow_file(tmp_path / f"x.{fmt.lower()}", fmt)
    assert (await load(f"x.{fmt.lower()}", tmp_path)).mime == mime


async def test_relative_paths_resolve_against_the_base_dir(tmp_path: Path) -> None:
    (tmp_path / "sub dir").mkdir()
    shutil.copy(PNG, tmp_path / "sub dir" / "ünïcode horse.png")
    assert (await load("sub dir/ünïcode horse.png", tmp_path)).mime == "image/png"


async def test_absolute_paths_ignore_the_base_dir(tmp_path: Path) -> None:
    assert (await load(str(PNG), tmp_path / "elsewhere")).mime == "image/png"


async def test_image_exactly_at_the_base64_limit_is_accepted() -> None:
    limit = b64_len(PNG.stat().st_size)
    img = await load("horse.png", limit=limit)
    assert len(img.url.partition(",")[2]) == limit


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize("url", [
    "http://example.com/a.png",
    "https://example.com/photos/a%20b.jpg?sig=abc&x=1",
    "HTTPS://EXAMPLE.COM/A.PNG",
])
async def test_http_urls_pass_through_unchanged(tmp_path: Path, url: str) -> None:
    img = await load(url, tmp_path)
    assert img == PreparedImage(url, None, None)


# --------------------------------------------------------------------------- bad images


async def test_missing_file_is_bad_image_naming_the_path(tmp_path: Path) -> None:
    e = await failure("nope.png", tmp_path)
    assert "not found" in e.message and str(tmp_path / "nope.png") in e.message


async def test_zero_byte_file_is_bad_image(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    e = await failure("empty.png", tmp_path)
    assert "empty" in e.message and "empty.png" in e.message


async def test_directory_is_bad_image(tmp_path: Path) -> None:
    (tmp_path / "album.jpg").mkdir()
    e = await failure("album.jpg", tmp_path)
    assert "directory" in e.message


async def test_text_file_named_jpg_is_bad_image(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    e = await failure("notes.jpg", tmp_path)
    assert "not an image" in e.message and "notes.jpg" in e.message


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
async def test_formats_the_providers_refuse_are_converted(tmp_path: Path, fmt: str) -> None:
    pillow_file(tmp_path / "scan.jpg", fmt)  # extension lies too
    img = await load("scan.jpg", tmp_path)
    mime, data = decode(img.url)
    assert mime == img.mime and mime in ("image/jpeg", "image/png")
    with Image.open(io.BytesIO(data)) as im:
        assert Image.MIME[im.format] == mime
        assert im.size == (8, 8) == (img.width, img.height)
        r, g, b = im.convert("RGB").getpixel((4, 4))
        assert r > 160 and g < 70 and b < 70  # still the red square
    assert img.sent_bytes == len(data)
    assert img.sha256 == hashlib.sha256((tmp_path / "scan.jpg").read_bytes()).hexdigest()


async def test_image_over_the_limit_is_reencoded_to_fit() -> None:
    limit = b64_len(PNG.stat().st_size) - 1
    img = await load("horse.png", SAMPLES, limit=limit)
    mime, data = decode(img.url)
    assert data != PNG.read_bytes(), "over the cap: it cannot be the original bytes"
    assert len(img.url.partition(",")[2]) <= limit
    assert img.sent_bytes == len(data)
    with Image.open(PNG) as im:
        assert (img.orig_width, img.orig_height) == im.size
    assert img.sha256 == hashlib.sha256(PNG.read_bytes()).hexdigest()  # of the original


async def test_limit_is_measured_on_base64_not_file_size(tmp_path: Path) -> None:
    size = PNG.stat().st_size
    assert size < b64_len(size)
    img = await load("horse.png", SAMPLES, limit=size + 1)  # file fits, its base64 does not
    assert decode(img.url)[1] != PNG.read_bytes()
    assert len(img.url.partition(",")[2]) <= size + 1


async def test_large_image_is_downscaled_and_reports_both_sizes(tmp_path: Path) -> None:
    Image.new("RGB", (3200, 1600), (10, 120, 200)).save(tmp_path / "wide.jpg", quality=90)
    img = await load("wide.jpg", tmp_path)
    mime, data = decode(img.url)
    assert mime == "image/jpeg"
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (1568, 784)
    assert (img.width, img.height) == (1568, 784)             # as sent
    assert (img.orig_width, img.orig_height) == (3200, 1600)  # the original
    assert img.columns() == {"width": 3200, "height": 1600, "sent_width": 1568,
                             "sent_height": 784, "sent_bytes": len(data),
                             "image_sha256": img.sha256}


async def test_max_edge_of_the_policy_is_used(tmp_path: Path) -> None:
    Image.new("RGB", (1000, 500), (10, 120, 200)).save(tmp_path / "a.png")
    img = await ImageSource(tmp_path, ImagePolicy(max_edge=200)).load(row("a.png"))
    assert (img.width, img.height, img.orig_width, img.orig_height) == (200, 100, 1000, 500)


async def test_corrupt_image_that_must_be_decoded_is_bad_image_naming_the_file(
        tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((3000, 2000), 50).convert("RGB").save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: buf.tell() // 2])
    e = await failure("cut.jpg", tmp_path)
    assert "cut.jpg" in e.message and "truncated" in e.message


# --------------------------------------------------------------------------- --fetch-urls seam


class StubFetcher:
    def __init__(self, data: bytes | Exception) -> None:
        self.data = data
        self.urls: list[str] = []

    async def fetch(self, url: str) -> bytes:
        self.urls.append(url)
        if isinstance(self.data, Exception):
            raise self.data
        return self.data


async def test_with_a_fetcher_urls_are_downloaded_and_sent_inline(tmp_path: Path) -> None:
    fetcher = StubFetcher(PNG.read_bytes())
    src = ImageSource(tmp_path, ImagePolicy(), fetcher=fetcher)
    img = await src.load(row("https://example.com/horse?x=1"))
    assert fetcher.urls == ["https://example.com/horse?x=1"]
    assert decode(img.url) == ("image/png", PNG.read_bytes())
    assert img.sha256 == hashlib.sha256(PNG.read_bytes()).hexdigest()


async def test_downloaded_bytes_that_are_no_image_are_bad_image_naming_the_url(
        tmp_path: Path) -> None:
    src = ImageSource(tmp_path, ImagePolicy(), fetcher=StubFetcher(b"<html>nope</html>"))
    with pytest.raises(RowFailed) as info:
        await src.load(row("https://example.com/a.jpg"))
    assert info.value.error_class == "bad_image"
    assert "not an image" in info.value.message
    assert "https://example.com/a.jpg" in info.value.message


async def test_download_failure_is_passed_on(tmp_path: Path) -> None:
    err = RowFailed("image download failed: HTTP 404: https://example.com/a.jpg", "bad_image")
    src = ImageSource(tmp_path, ImagePolicy(), fetcher=StubFetcher(err))
    with pytest.raises(RowFailed) as info:
        await src.load(row("https://example.com/a.jpg"))
    assert info.value is err


async def test_local_files_do_not_use_the_fetcher(tmp_path: Path) -> None:
    fetcher = StubFetcher(b"")
    img = await ImageSource(SAMPLES, ImagePolicy(), fetcher=fetcher).load(row("horse.png"))
    assert img.mime == "image/png" and fetcher.urls == []


async def test_file_with_image_magic_but_no_image_is_bad_image(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    e = await failure("broken.png", tmp_path)
    assert "broken.png" in e.message and "image/png" in e.message


async def test_unreadable_file_is_bad_image(tmp_path: Path) -> None:
    link = tmp_path / "loop.png"
    link.symlink_to(link)  # reading a self-referencing link fails with an OSError
    e = await failure("loop.png", tmp_path)
    assert "loop.png" in e.message


# --------------------------------------------------------------------------- bounded reads


async def test_a_fifo_is_bad_image_and_never_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")  # no writer: opening it for a read would block forever
    e = await failure("pipe.png", tmp_path)
    assert "FIFO (named pipe), not a regular file" in e.message and "pipe.png" in e.message


async def test_a_symlink_to_dev_zero_is_bad_image(tmp_path: Path) -> None:
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    e = await failure("zero.jpg", tmp_path)
    assert "character device, not a regular file" in e.message


async def test_a_unix_socket_is_bad_image(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s.png"))
        e = await failure("s.png", tmp_path)
    assert "socket, not a regular file" in e.message


async def test_a_file_over_max_file_bytes_is_bad_image_before_any_read(tmp_path: Path) -> None:
    huge = tmp_path / "junk.jpg"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: it costs no disk, and is never read
    src = ImageSource(tmp_path, ImagePolicy(), limits=ReadLimits(max_bytes=256 << 20))
    with pytest.raises(RowFailed) as info:
        await src.load(row("junk.jpg"))
    assert info.value.error_class == "bad_image"
    assert f"too large: {1 << 30} bytes > {256 << 20} (--max-file-bytes)" in info.value.message


async def test_a_file_of_exactly_max_file_bytes_is_read(tmp_path: Path) -> None:
    size = PNG.stat().st_size
    img = await ImageSource(SAMPLES, ImagePolicy(), limits=ReadLimits(max_bytes=size)).load(
        row("horse.png"))
    assert decode(img.url)[1] == PNG.read_bytes()


def test_a_file_that_grows_while_it_is_read_stops_at_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "growing.bin"
    path.write_bytes(b"x" * 5000)
    fd = os.open(path, os.O_RDONLY)
    try:  # the size seen at open time was 100 bytes; the file now holds 5000
        with pytest.raises(RowFailed, match="grew past 1000 bytes"):
            _read_capped(fd, 100, 1000, path)
    finally:
        os.close(fd)


def test_a_short_first_read_is_continued(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"0123456789" * 300)
    fd = os.open(path, os.O_RDONLY)
    try:  # told the file is 10 bytes: the first read is short of the real content
        assert _read_capped(fd, 10, 10_000, path) == b"0123456789" * 300
    finally:
        os.close(fd)


async def test_a_nul_byte_in_the_path_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(RowFailed) as info:
        await load("a\x00b.png", tmp_path)
    assert info.value.error_class == "bad_input"
    assert "NUL byte" in info.value.message and "'a\\x00b.png'" in info.value.message


async def test_a_home_of_an_unknown_user_is_taken_literally(tmp_path: Path) -> None:
    e = await failure("~no-such-user-here/a.png", tmp_path)
    assert "not found" in e.message


async def test_a_read_that_hangs_is_bad_image_after_the_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hung(path: Path, max_bytes: int) -> bytes:  # as a read on a dead network mount
        release.wait()
        return b""

    monkeypatch.setattr(images_module, "read_file", hung)
    src = ImageSource(tmp_path, ImagePolicy(), DaemonPool(1),
                      limits=ReadLimits(timeout=0.2))
    try:
        with pytest.raises(RowFailed) as info:
            await src.load(row("slow.png"))
    finally:
        release.set()
    assert info.value.error_class == "bad_image"
    assert "took longer than 0.2 s (--image-timeout" in info.value.message


# --------------------------------------------------------------------------- sniff_mime


@pytest.mark.parametrize("head, mime", [
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
    (b"GIF89a\x01\x00", "image/gif"),
    (b"GIF87a\x01\x00", "image/gif"),
    (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
    (b"II*\x00\x08\x00\x00\x00", "image/tiff"),
    (b"MM\x00*\x00\x00\x00\x08", "image/tiff"),
    (b"BM\x36\x00\x00\x00", "image/bmp"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00", "image/heic"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00", "image/avif"),
])
def test_sniff_mime_recognises_magic_numbers(head: bytes, mime: str) -> None:
    assert sniff_mime(head) == mime


@pytest.mark.parametrize("head", [b"", b"hello world", b"RIFF\x24\x00\x00\x00WAVEfmt ",
                                  b"%PDF-1.7", b"\xff\xd8"])
def test_sniff_mime_returns_none_for_non_images(head: bytes) -> None:
    assert sniff_mime(head) is None


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 4), (2, 4), (3, 4), (4, 8), (3_000, 4_000)])
def test_b64_len_is_the_padded_base64_length(n: int, expected: int) -> None:
    assert b64_len(n) == expected == len(base64.b64encode(b"x" * n))
