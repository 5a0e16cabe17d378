"""HEIC, AVIF and the TIFFs Pillow refuses or misreads caption ok, sent as JPEG/PNG of
the right size and orientation (images generated in the test)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.images.prepare import ImagePolicy, prepare
from pipeline.simulator.thread import SimThread

from .helpers import caption, rows

W, H = 96, 48  # wider than tall: a rotation shows in the sent size
RED, BLUE = (220, 20, 20), (20, 20, 220)


def _halves() -> np.ndarray:
    """Left half red, right half blue (H x W x 3, uint8): orientation is visible."""
    arr = np.zeros((H, W, 3), np.uint8)
    arr[:, : W // 2] = RED
    arr[:, W // 2:] = BLUE
    return arr


def _pillow(fmt: str, orientation: int = 1) -> bytes:
    import pillow_heif

    pillow_heif.register_heif_opener()
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(_halves()).save(buf, fmt, exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _tiff(arr: np.ndarray, **options: object) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **options)
    return buf.getvalue()


def _planar_pages() -> bytes:
    planes = np.moveaxis(_halves(), -1, 0)  # (3, H, W): one plane per channel
    return _tiff(np.stack([planes, planes[::-1]]), photometric="rgb", planarconfig="separate")


def _planar_16bit() -> bytes:
    planes = np.moveaxis(_halves().astype(np.uint16) * 257, -1, 0)
    return _tiff(planes, photometric="rgb", planarconfig="separate")


def _rgb_16bit() -> bytes:
    return _tiff(_halves().astype(np.uint16) * 257, photometric="rgb")


def _float_rgb() -> bytes:
    return _tiff(_halves().astype(np.float32) / 255.0, photometric="rgb")


def _float_hdr() -> bytes:  # values far outside [0, 1]: scaled by their range
    return _tiff(_halves().astype(np.float32) * 40.0 - 100.0, photometric="rgb")


CASES = {
    "heic": lambda: _pillow("HEIF"),
    "avif": lambda: _pillow("AVIF"),
    "planar-rgb-multipage.tif": _planar_pages,
    "planar-rgb-16bit.tif": _planar_16bit,
    "rgb-16bit.tif": _rgb_16bit,
    "float32-rgb.tif": _float_rgb,
    "float32-hdr.tif": _float_hdr,
}


def _colours(data: bytes) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int]]:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    return im.getpixel((w // 8, h // 2)), im.getpixel((w - 1 - w // 8, h // 2)), im.size


def _close(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b)) < 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_sent_as_jpeg_of_the_same_size_with_left_red_and_right_blue(name: str) -> None:
    p = prepare(CASES[name](), ImagePolicy())
    assert p.mime == "image/jpeg" and p.reencoded
    left, right, size = _colours(p.data)
    assert size == (W, H) == (p.sent_width, p.sent_height) == (p.width, p.height)
    if name == "float32-hdr.tif":  # scaled by the range: still two distinct halves
        assert left[0] > left[2] and right[2] > right[0]
    else:
        assert _close(left, RED) and _close(right, BLUE), (left, right)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_exif_orientation_of_heic_and_avif_is_applied(fmt: str) -> None:
    p = prepare(_pillow(fmt, orientation=6), ImagePolicy())  # 6: rotate 90° clockwise
    im = Image.open(io.BytesIO(p.data)).convert("RGB")
    assert im.size == (H, W) == (p.width, p.height)
    top, bottom = im.getpixel((H // 2, W // 8)), im.getpixel((H // 2, W - 1 - W // 8))
    assert _close(top, RED) and _close(bottom, BLUE), (top, bottom)


def test_a_large_float_tiff_is_cut_to_max_edge() -> None:
    big = np.random.default_rng(1).random((600, 900, 3), dtype=np.float32)
    p = prepare(_tiff(big, photometric="rgb"), ImagePolicy(max_edge=300))
    assert (p.width, p.height) == (900, 600) and (p.sent_width, p.sent_height) == (300, 200)


def test_a_corrupt_tiff_is_a_problem_naming_the_format() -> None:
    from pipeline.images.prepare import ImageProblem

    data = _float_rgb()
    with pytest.raises(ImageProblem, match="image/tiff"):
        prepare(data[:200], ImagePolicy())


def test_every_generated_format_captions_ok_with_the_sent_size(tmp_path: Path,
                                                               sim: SimThread) -> None:
    folder = tmp_path / "formats"
    folder.mkdir()
    for name, make in CASES.items():
        (folder / name).write_bytes(make())
    assert caption(sim, folder, tmp_path / "out") == 0
    got = {r["id"]: r for r in rows(tmp_path / "out")}
    assert sorted(got) == sorted(CASES)
    for r in got.values():
        assert r["status"] == "ok" and r["caption"], r["error"]
        assert (r["width"], r["height"], r["sent_width"], r["sent_height"]) == (W, H, W, H)
