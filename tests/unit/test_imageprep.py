"""Specification of pipeline/imageprep.py: bytes in, what is actually sent out.

Every input is a real file made with Pillow here (or a photo of data/sample), and every
assertion is about what would be sent: the decoded bytes' format, pixel size, mode,
orientation, colours, and the base64 length against the cap. Nothing is mocked except
a spy that records whether large JPEGs are decoded at reduced size (``draft``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from pipeline.images.prepare import ImagePolicy, ImageProblem, Prepared, b64_len, prepare

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "sample"
DEFAULT = ImagePolicy()
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 255, 255)


# --------------------------------------------------------------------------- helpers


def encode(im: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def opened(p: Prepared) -> Image.Image:
    """The image as the provider would decode it (and its format checked against mime)."""
    im = Image.open(io.BytesIO(p.data))
    assert {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
            "WEBP": "image/webp"}[im.format] == p.mime, (im.format, p.mime)
    im.load()
    return im


def close(pixel: tuple[int, ...], colour: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


def rgb_at(im: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return im.convert("RGB").getpixel(xy)  # type: ignore[return-value]


def within_cap(p: Prepared, policy: ImagePolicy) -> bool:
    return len(base64.b64encode(p.data)) <= policy.max_bytes


def check_sent(p: Prepared, policy: ImagePolicy = DEFAULT) -> Image.Image:
    """Common invariants of every prepared image; returns the decoded image."""
    im = opened(p)
    assert im.size == (p.sent_width, p.sent_height)
    assert max(im.size) <= policy.max_edge
    assert within_cap(p, policy)
    assert p.sent_width <= p.width and p.sent_height <= p.height  # never enlarged
    assert p.mime in policy.accepted
    assert getattr(im, "n_frames", 1) == 1 or not p.reencoded
    return im


def halves(size: tuple[int, int], left: tuple[int, int, int] = RED,
           right: tuple[int, int, int] = BLUE, mode: str = "RGB") -> Image.Image:
    """Left half one colour, right half another: survives any downscale."""
    w, h = size
    im = Image.new(mode, size, left)
    im.paste(right, (w // 2, 0, w, h))
    return im


def noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Incompressible content, so byte caps really bite."""
    rng = np.random.default_rng(7)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def with_orientation(im: Image.Image, fmt: str, orientation: int, **options: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes(), **options)


# --------------------------------------------------------------------------- large JPEG


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return encode(halves((6000, 4000)), "JPEG", quality=90)


def test_large_jpeg_is_downscaled_to_the_long_edge_as_jpeg(big_jpeg: bytes) -> None:
    p = prepare(big_jpeg, DEFAULT)
    im = check_sent(p)
    assert p.mime == "image/jpeg" and im.format == "JPEG" and im.mode == "RGB"
    assert (p.width, p.height) == (6000, 4000)
    assert (p.sent_width, p.sent_height) == (1568, 1045)
    assert p.reencoded
    assert p.sha256 == hashlib.sha256(big_jpeg).hexdigest()
    # the content is the picture, scaled: left half red, right half blue
    assert close(rgb_at(im, (100, 500)), RED) and close(rgb_at(im, (1468, 500)), BLUE)


def test_large_jpeg_is_decoded_at_reduced_size_by_draft(big_jpeg: bytes,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[tuple[int, int], tuple[int, int]]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # type: ignore[no-untyped-def]
        before = self.size
        out = original(self, mode, size)
        seen.append((before, self.size))
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    p = prepare(big_jpeg, DEFAULT)
    assert (p.sent_width, p.sent_height) == (1568, 1045)
    # 6000x4000 -> the DCT decodes at 1/2 (3000x2000), still >= 1568 on the long edge
    assert ((6000, 4000), (3000, 2000)) in seen


@pytest.mark.parametrize("size, sent", [((3000, 2000), (1568, 1045)),
                                        ((2000, 3000), (1045, 1568)),
                                        ((1569, 1569), (1568, 1568)),
                                        ((1600, 200), (1568, 196))])
def test_long_edge_is_cut_to_max_edge_keeping_the_aspect_ratio(
        size: tuple[int, int], sent: tuple[int, int]) -> None:
    p = prepare(encode(halves(size), "JPEG"), DEFAULT)
    check_sent(p)
    assert (p.width, p.height) == size
    assert (p.sent_width, p.sent_height) == sent


def test_max_edge_is_configurable() -> None:
    p = prepare(encode(halves((1000, 500)), "PNG"), ImagePolicy(max_edge=256))
    im = check_sent(p, ImagePolicy(max_edge=256))
    assert im.size == (256, 128)


# --------------------------------------------------------------------------- orientation


def corner_image(size: tuple[int, int] = (400, 200)) -> Image.Image:
    """Dark grey, with a red block in the stored top-left corner."""
    im = Image.new("RGB", size, (40, 40, 40))
    im.paste(RED, (0, 0, size[0] // 5, size[1] // 5))
    return im


def red_corners(im: Image.Image) -> list[str]:
    w, h = im.size
    spots = {"top-left": (5, 5), "top-right": (w - 6, 5), "bottom-left": (5, h - 6),
             "bottom-right": (w - 6, h - 6)}
    return [name for name, xy in spots.items() if close(rgb_at(im, xy), RED, 60)]


def test_exif_orientation_6_is_applied_dims_swapped_corner_where_a_viewer_sees_it() -> None:
    data = with_orientation(corner_image((400, 200)), "JPEG", 6, quality=95)
    p = prepare(data, DEFAULT)
    im = check_sent(p)
    assert p.reencoded
    assert (p.width, p.height) == (200, 400)          # original, after orientation
    assert (p.sent_width, p.sent_height) == (200, 400)
    # orientation 6 = "rotate 90 degrees clockwise to view": stored top-left -> top-right
    assert red_corners(im) == ["top-right"]
    # the tag is not carried over, or a viewer would rotate a second time
    assert im.getexif().get(0x0112, 1) == 1


# (orientation, where the stored top-left corner is seen, dimensions swapped)
ORIENTATIONS = [(2, "top-right", False), (3, "bottom-right", False),
                (4, "bottom-left", False), (5, "top-left", True), (6, "top-right", True),
                (7, "bottom-right", True), (8, "bottom-left", True)]


@pytest.mark.parametrize("orientation, corner, swapped", ORIENTATIONS)
def test_every_exif_orientation_is_applied(orientation: int, corner: str,
                                           swapped: bool) -> None:
    p = prepare(with_orientation(corner_image(), "JPEG", orientation, quality=95), DEFAULT)
    im = check_sent(p)
    assert im.size == ((200, 400) if swapped else (400, 200))
    assert red_corners(im) == [corner]


def test_orientation_is_applied_before_the_long_edge_is_measured() -> None:
    data = with_orientation(corner_image((3200, 1600)), "JPEG", 8, quality=90)
    p = prepare(data, DEFAULT)
    im = check_sent(p)
    assert (p.width, p.height) == (1600, 3200)
    assert im.size == (784, 1568)
    assert red_corners(im) == ["bottom-left"]


def test_orientation_1_jpeg_that_fits_is_untouched() -> None:
    data = with_orientation(corner_image(), "JPEG", 1)
    p = prepare(data, DEFAULT)
    assert p.data == data and not p.reencoded


def test_png_with_exif_orientation_and_alpha_is_rotated_and_stays_png() -> None:
    im = corner_image((300, 100)).convert("RGBA")
    im.putpixel((299, 99), (0, 0, 0, 0))
    p = prepare(with_orientation(im, "PNG", 6), DEFAULT)
    sent = check_sent(p)
    assert p.mime == "image/png" and sent.mode == "RGBA"
    assert sent.size == (100, 300)
    assert red_corners(sent) == ["top-right"]
    assert sent.getpixel((0, 299))[3] == 0  # stored bottom-right -> bottom-left
    assert sent.getexif().get(0x0112, 1) == 1


# --------------------------------------------------------------------------- alpha


def transparent_left(size: tuple[int, int]) -> Image.Image:
    """RGBA: left half fully transparent (black behind it), right half opaque green."""
    w, h = size
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    alpha = Image.new("L", size, 0)
    alpha.paste(255, (w // 2, 0, w, h))
    im.putalpha(alpha)
    im.paste(GREEN + (255,), (w // 2, 0, w, h))
    return im


def test_png_with_alpha_that_needs_resizing_stays_png_with_alpha() -> None:
    data = encode(transparent_left((3000, 2000)), "PNG")
    p = prepare(data, DEFAULT)
    im = check_sent(p)
    assert p.mime == "image/png" and im.mode == "RGBA" and p.reencoded
    assert im.size == (1568, 1045)
    assert im.getpixel((100, 500))[3] == 0
    assert im.getpixel((1468, 500)) == GREEN + (255,)


def test_huge_rgba_over_a_tiny_cap_becomes_jpeg_composited_on_white() -> None:
    # left half transparent, right half opaque noise: no PNG of it fits, so JPEG on white
    w, h = 1800, 1200
    im = noise((w, h), "RGBA")
    alpha = Image.new("L", (w, h), 0)
    alpha.paste(255, (w // 2, 0, w, h))
    im.putalpha(alpha)
    data = encode(im, "PNG", compress_level=1)
    policy = ImagePolicy(max_bytes=300_000)
    p = prepare(data, policy)
    sent = check_sent(p, policy)
    assert p.mime == "image/jpeg" and sent.mode == "RGB"
    assert close(rgb_at(sent, (20, 20)), WHITE, 12), "a transparent pixel must be white"
    assert close(rgb_at(sent, (sent.width // 4, sent.height // 2)), WHITE, 12)
    right = np.asarray(sent)[:, sent.width * 3 // 4 - 50:sent.width * 3 // 4 + 50]
    assert 90 < right.mean() < 170, "the opaque half keeps its (noisy) content"


def test_opaque_rgba_that_needs_resizing_is_not_kept_as_png_for_a_useless_alpha() -> None:
    im = halves((2000, 1000)).convert("RGBA")  # alpha 255 everywhere
    p = prepare(encode(im, "PNG"), DEFAULT)
    sent = check_sent(p)
    assert p.mime == "image/jpeg" and sent.size == (1568, 784)


def test_palette_png_with_transparency_that_fits_is_untouched() -> None:
    data = encode(palette_image((60, 40)), "PNG", transparency=0)
    p = prepare(data, DEFAULT)
    assert p.data == data and not p.reencoded and p.mime == "image/png"


def test_palette_png_with_transparency_keeps_it_when_resized() -> None:
    data = encode(palette_image((2400, 1600)), "PNG", transparency=0)
    p = prepare(data, DEFAULT)
    im = check_sent(p)
    assert p.mime == "image/png" and im.mode == "RGBA"
    assert im.size == (1568, 1045)
    assert im.getpixel((10, 500))[3] == 0                  # index 0: transparent
    assert im.getpixel((1558, 500)) == BLUE + (255,)       # index 1: opaque blue


def palette_image(size: tuple[int, int]) -> Image.Image:
    im = Image.new("P", size, 0)
    im.putpalette(list(RED) + list(BLUE) + [0] * (256 * 3 - 6))
    im.paste(1, (size[0] // 2, 0, size[0], size[1]))
    return im


# --------------------------------------------------------------------------- conversions


def gradient16(size: tuple[int, int] = (512, 64), top: int = 65535) -> bytes:
    row = np.linspace(0, top, size[0]).astype(np.uint16)
    im = Image.fromarray(np.tile(row, (size[1], 1)))
    assert im.mode == "I;16"
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    return data


def test_16_bit_grayscale_png_becomes_8_bit_with_the_gradient_preserved() -> None:
    p = prepare(gradient16(), DEFAULT)
    im = check_sent(p)
    assert p.reencoded and im.mode == "L" and im.size == (512, 64)
    row = np.asarray(im)[32].astype(int)
    expected = np.linspace(0, 255, 512)
    assert np.abs(row - expected).max() <= 6, "values are scaled 65535 -> 255"
    steps = row[::32]
    assert (np.diff(steps) > 0).all(), f"gradient not monotonic: {steps}"


def test_16_bit_scale_does_not_depend_on_the_brightest_pixel() -> None:
    dark = prepare(gradient16(top=255), DEFAULT)
    darkish = prepare(gradient16(top=256), DEFAULT)
    a = np.asarray(opened(dark)).astype(int)
    b = np.asarray(opened(darkish)).astype(int)
    assert np.abs(a - b).max() <= 2


def test_cmyk_jpeg_becomes_an_rgb_jpeg_with_the_right_colour() -> None:
    im = Image.new("CMYK", (300, 200), (0, 255, 255, 0))   # red in CMYK
    im.paste((255, 255, 0, 0), (150, 0, 300, 200))          # blue
    p = prepare(encode(im, "JPEG"), DEFAULT)
    sent = check_sent(p)
    assert p.mime == "image/jpeg" and sent.mode == "RGB" and sent.size == (300, 200)
    assert close(rgb_at(sent, (20, 100)), RED) and close(rgb_at(sent, (280, 100)), BLUE)


def test_large_cmyk_jpeg_is_converted_and_downscaled() -> None:
    im = Image.new("CMYK", (3000, 1500), (0, 255, 255, 0))
    p = prepare(encode(im, "JPEG"), DEFAULT)
    sent = check_sent(p)
    assert sent.mode == "RGB" and sent.size == (1568, 784)
    assert close(rgb_at(sent, (700, 400)), RED)


def test_animated_gif_sends_the_first_frame_only() -> None:
    frames = [Image.new("RGB", (120, 80), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100,
                  loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    p = prepare(data, DEFAULT)
    sent = check_sent(p)
    assert p.reencoded and getattr(sent, "n_frames", 1) == 1
    assert sent.size == (120, 80) and (p.width, p.height) == (120, 80)
    assert close(rgb_at(sent, (60, 40)), RED, 10), "frame 0 is red"


def test_animated_webp_sends_the_first_frame_only() -> None:
    frames = [Image.new("RGB", (64, 48), c) for c in (BLUE, RED)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100,
                  lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    sent = check_sent(p := prepare(data, DEFAULT))
    assert p.reencoded and close(rgb_at(sent, (32, 24)), BLUE, 10)


def test_multi_page_tiff_sends_the_first_page_as_jpeg_or_png() -> None:
    pages = [halves((800, 600), GREEN, RED), Image.new("RGB", (50, 50), BLUE)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    p = prepare(data, DEFAULT)
    sent = check_sent(p)
    assert p.mime in ("image/jpeg", "image/png")
    assert sent.size == (800, 600)
    assert close(rgb_at(sent, (100, 300)), GREEN) and close(rgb_at(sent, (700, 300)), RED)


def test_large_tiff_is_converted_and_downscaled() -> None:
    data = encode(halves((4000, 3000)), "TIFF")
    p = prepare(data, DEFAULT)
    sent = check_sent(p)
    assert sent.size == (1568, 1176) and (p.width, p.height) == (4000, 3000)


def test_bmp_is_converted() -> None:
    data = encode(halves((300, 200), GREEN, BLUE), "BMP")
    p = prepare(data, DEFAULT)
    sent = check_sent(p)
    assert p.reencoded and p.mime in ("image/jpeg", "image/png")
    assert sent.size == (300, 200)
    assert close(rgb_at(sent, (20, 100)), GREEN) and close(rgb_at(sent, (280, 100)), BLUE)


def test_bilevel_png_that_fits_is_untouched_and_a_big_one_is_converted() -> None:
    small = encode(Image.new("1", (100, 100), 1), "PNG")
    assert prepare(small, DEFAULT).data == small
    big = prepare(encode(Image.new("1", (2000, 2000), 1), "PNG"), DEFAULT)
    sent = check_sent(big)
    assert sent.size == (1568, 1568) and close(rgb_at(sent, (10, 10)), WHITE, 5)


def test_webp_that_fits_is_untouched() -> None:
    data = encode(halves((300, 200)), "WEBP", quality=80)
    p = prepare(data, DEFAULT)
    assert p.data == data and p.mime == "image/webp" and not p.reencoded


def test_large_webp_is_downscaled() -> None:
    p = prepare(encode(halves((2400, 1200)), "WEBP", quality=80), DEFAULT)
    sent = check_sent(p)
    assert sent.size == (1568, 784)
    assert close(rgb_at(sent, (100, 400)), RED) and close(rgb_at(sent, (1468, 400)), BLUE)


def test_format_comes_from_the_bytes() -> None:
    png = encode(halves((64, 64)), "PNG")
    assert prepare(png, DEFAULT).mime == "image/png"
    gif = encode(halves((64, 64)), "GIF")
    assert prepare(gif, DEFAULT).mime == "image/gif"
    jpg = encode(halves((64, 64)), "JPEG")
    assert prepare(jpg, DEFAULT).mime == "image/jpeg"


# --------------------------------------------------------------------------- untouched


def test_small_jpeg_that_fits_is_returned_byte_for_byte() -> None:
    data = encode(noise((640, 480)), "JPEG", quality=92)
    p = prepare(data, DEFAULT)
    assert p.data == data
    assert not p.reencoded and p.mime == "image/jpeg"
    assert (p.width, p.height, p.sent_width, p.sent_height) == (640, 480, 640, 480)
    assert p.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP"])
def test_never_upscales_a_small_image(fmt: str) -> None:
    data = encode(halves((100, 50)), fmt)
    p = prepare(data, ImagePolicy(max_edge=1568))
    sent = check_sent(p)
    assert sent.size == (100, 50) == (p.sent_width, p.sent_height)
    assert p.reencoded == (fmt == "BMP")  # only the format the providers refuse is converted


def test_never_upscales_when_reencoding_for_orientation() -> None:
    p = prepare(with_orientation(corner_image((100, 50)), "JPEG", 6), DEFAULT)
    assert check_sent(p).size == (50, 100)


def test_image_exactly_at_the_cap_is_untouched_one_byte_less_is_reencoded() -> None:
    data = encode(noise((300, 200)), "JPEG", quality=95)
    at = b64_len(len(data))
    assert prepare(data, ImagePolicy(max_bytes=at)).data == data
    p = prepare(data, ImagePolicy(max_bytes=at - 1))
    assert p.reencoded and within_cap(p, ImagePolicy(max_bytes=at - 1))


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.iterdir()
                                        if p.suffix in (".png", ".jpg")))
def test_sample_photos_pass_untouched(name: str) -> None:
    data = (SAMPLES / name).read_bytes()
    p = prepare(data, DEFAULT)
    assert p.data == data and not p.reencoded
    with Image.open(SAMPLES / name) as im:
        assert (p.width, p.height) == (p.sent_width, p.sent_height) == im.size
        assert p.mime == Image.MIME[im.format]


@pytest.mark.parametrize("name", ["hubble_deep_field.jpg", "astronaut.png"])
def test_sample_photos_downscale_under_a_small_edge_and_cap(name: str) -> None:
    policy = ImagePolicy(max_edge=300, max_bytes=40_000)
    p = prepare((SAMPLES / name).read_bytes(), policy)
    sent = check_sent(p, policy)
    with Image.open(SAMPLES / name) as im:
        w, h = im.size
    assert max(sent.size) <= 300
    assert abs(sent.width / sent.height - w / h) < 0.02


# --------------------------------------------------------------------------- byte cap


@pytest.fixture(scope="module")
def noisy_jpeg() -> bytes:
    return encode(noise((1200, 900)), "JPEG", quality=95)


def test_cap_first_lowers_quality_keeping_the_size(noisy_jpeg: bytes) -> None:
    # the cap sits between what quality 85 and quality 55 produce at full size
    decoded = Image.open(io.BytesIO(noisy_jpeg)).convert("RGB")
    q85, q55 = (len(encode(decoded, "JPEG", quality=q)) for q in (85, 55))
    assert q55 < q85
    policy = ImagePolicy(max_bytes=b64_len((q55 + q85) // 2))
    p = prepare(noisy_jpeg, policy)
    sent = check_sent(p, policy)
    assert sent.size == (1200, 900), "quality alone was enough"
    assert len(p.data) < q85


@pytest.mark.parametrize("cap", [200_000, 60_000, 15_000])
def test_cap_forces_size_down_until_the_base64_fits(noisy_jpeg: bytes, cap: int) -> None:
    policy = ImagePolicy(max_bytes=cap)
    p = prepare(noisy_jpeg, policy)
    sent = check_sent(p, policy)
    assert len(base64.b64encode(p.data)) <= cap
    assert sent.width < 1200, "noise at 1200x900 cannot fit without shrinking"
    assert abs(sent.width / sent.height - 4 / 3) < 0.02
    assert (p.width, p.height) == (1200, 900)


def test_cap_is_measured_on_base64_not_on_the_file_size() -> None:
    data = encode(noise((400, 300)), "PNG")
    policy = ImagePolicy(max_bytes=len(data) + 1)   # the file fits, its base64 does not
    p = prepare(data, policy)
    assert p.reencoded and within_cap(p, policy)


def test_an_impossible_cap_is_a_readable_problem() -> None:
    with pytest.raises(ImageProblem, match="cannot fit the image under 100 bytes"):
        prepare(encode(noise((400, 300)), "JPEG"), ImagePolicy(max_bytes=100))


# --------------------------------------------------------------------------- problems


def test_truncated_large_jpeg_is_a_readable_problem(big_jpeg: bytes) -> None:
    with pytest.raises(ImageProblem) as info:
        prepare(big_jpeg[: len(big_jpeg) // 2], DEFAULT)
    msg = str(info.value)
    assert "image/jpeg" in msg and "truncated" in msg
    assert "Traceback" not in msg and len(msg) < 300


def test_truncated_small_jpeg_is_a_readable_problem() -> None:
    data = encode(noise((400, 300)), "JPEG")
    with pytest.raises(ImageProblem, match="truncated|corrupt"):
        prepare(data[: len(data) // 2], DEFAULT)


def test_text_bytes_are_not_an_image() -> None:
    with pytest.raises(ImageProblem, match="not an image"):
        prepare(b"id,image\n1,cat.jpg\n", DEFAULT)


def test_html_error_page_is_not_an_image() -> None:
    with pytest.raises(ImageProblem, match="not an image"):
        prepare(b"<!doctype html><html><body>404 Not Found</body></html>", DEFAULT)


def test_zero_bytes_are_an_empty_file() -> None:
    with pytest.raises(ImageProblem, match=r"empty file \(0 bytes\)"):
        prepare(b"", DEFAULT)


def test_png_magic_with_garbage_names_the_type() -> None:
    with pytest.raises(ImageProblem, match="image/png"):
        prepare(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, DEFAULT)


def test_heic_is_named_and_refused_readably() -> None:
    fake = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(ImageProblem, match="image/heic"):
        prepare(fake, DEFAULT)


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [15_000, 30_000])  # 225 MP (warning), 900 MP (error)
def test_decompression_bomb_is_refused_without_decoding(side: int) -> None:
    with pytest.raises(ImageProblem, match="too large to decode safely"):
        prepare(png_header_only(side, side), DEFAULT)


def test_problems_are_image_problems_not_pillow_exceptions() -> None:
    for data in (b"\xff\xd8\xff\xe0" + b"\x00" * 40, b"GIF89a" + b"\x01" * 20,
                 b"BM" + b"\x00" * 60):
        with pytest.raises(ImageProblem):
            prepare(data, DEFAULT)


def test_importing_the_image_stage_changes_no_pillow_global() -> None:
    import subprocess
    import sys

    code = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS; "
            "import pipeline.images.prepare; assert Image.MAX_IMAGE_PIXELS == before")
    subprocess.run([sys.executable, "-c", code], check=True)
