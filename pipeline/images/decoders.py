"""Decoders for what Pillow alone cannot open: HEIC/HEIF (pillow-heif) and difficult TIFFs.

* HEIC/HEIF (iPhone photos): pillow-heif registers an opener with Pillow, so these
  images go through the same path as any other (orientation, resize, re-encode).
  AVIF is Pillow's own (Pillow >= 11 reads it); pillow-heif's build here has no AVIF
  decoder, so nothing else is needed for it.
* TIFF: Pillow reads most TIFFs, but it refuses float samples and misreads a planar
  (one plane per channel) layout with more than 8 bits per sample (wrong pixels, no
  error), both common in scientific files. Those go to tifffile, which returns the
  first page as an array; it is brought to 8 bits (16-bit by a fixed scale, floats in
  [0, 1] as they are, other floats by their finite range) and to L, LA, RGB or RGBA.

Pure work on bytes, run in the image thread pool; every problem is ``Undecodable``.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["TiffFrame", "Undecodable", "is_tiff", "pillow_misreads", "register", "tiff_frame"]

_registered = False
_lock = threading.Lock()
# TIFF tags (TIFF 6.0): what decides whether Pillow can be trusted with a file.
_BITS, _SAMPLES, _PLANAR, _FORMAT, _EXTRA, _ORIENTATION, _PHOTOMETRIC = (
    258, 277, 284, 339, 338, 274, 262)


class Undecodable(Exception):
    """The TIFF cannot be decoded; the message says why (``prepare`` makes it a
    ``bad_image`` reason)."""


def register() -> None:
    """Let Pillow open HEIC/HEIF (once per process; a no-op without pillow-heif)."""
    global _registered
    if _registered:
        return
    with _lock:
        if not _registered:
            try:
                from pillow_heif import register_heif_opener
            except ImportError:  # the image is then "cannot be decoded", a bad_image row
                pass
            else:
                register_heif_opener()
            _registered = True


def is_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic, BigTIFF


def _tag(im: Image.Image, tag: int, default: Any) -> Any:
    value = getattr(im, "tag_v2", {}).get(tag, default)
    return value[0] if isinstance(value, tuple) and value else value


def pillow_misreads(im: Image.Image) -> bool:
    """A TIFF whose pixels Pillow would get wrong: planar with > 8 bits, or floats in
    more than one sample (Pillow has no such mode)."""
    bits = getattr(im, "tag_v2", {}).get(_BITS, (8,))
    bits = max(bits) if isinstance(bits, tuple) and bits else int(bits or 8)
    samples = int(_tag(im, _SAMPLES, 1) or 1)
    planar = int(_tag(im, _PLANAR, 1) or 1)
    floats = int(_tag(im, _FORMAT, 1) or 1) == 3
    return (planar == 2 and bits > 8) or (floats and samples > 1)


@dataclass(frozen=True)
class TiffFrame:
    frame: Image.Image  # 8-bit L, LA, RGB or RGBA, as stored (orientation not applied)
    orientation: int


def tiff_frame(data: bytes, max_pixels: int, pillow_error: str = "") -> TiffFrame:
    """The first page of a TIFF as an 8-bit frame, by tifffile."""
    try:
        import tifffile
    except ImportError:
        raise Undecodable("image/tiff image that cannot be decoded (needs tifffile: "
                           "pip install tifffile)") from None
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            pixels = int(page.imagewidth) * int(page.imagelength)
            if pixels > max_pixels:
                raise Undecodable(f"image too large to decode safely ({page.imagewidth}x"
                                   f"{page.imagelength} pixels > {max_pixels})")
            arr, axes = page.asarray(), page.axes
            orientation = int(page.tags[_ORIENTATION].value) if _ORIENTATION in page.tags \
                else 1
            extra = page.extrasamples
            photometric = int(page.photometric)
    except Undecodable:
        raise
    except Exception as e:  # tifffile raises many kinds for a corrupt or odd file
        why = f"{type(e).__name__}: {e}"[:200]
        also = f"; Pillow: {pillow_error[:120]}" if pillow_error else ""
        raise Undecodable(f"image/tiff image that cannot be decoded ({why}{also})") from None
    return TiffFrame(_to_frame(_channels_last(arr, axes), extra, photometric), orientation)


def _channels_last(arr: np.ndarray, axes: str) -> np.ndarray:
    """(Y, X) or (Y, X, S) from whatever page axes tifffile reports (planar 'SYX', ...)."""
    index = tuple(slice(None) if a in "YXS" else 0 for a in axes)
    arr, kept = arr[index], "".join(a for a in axes if a in "YXS")
    order = [kept.index(a) for a in "YXS" if a in kept]
    arr = np.transpose(arr, order)
    out: np.ndarray = arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    return out


def _to_frame(arr: np.ndarray, extra: tuple[int, ...], photometric: int) -> Image.Image:
    arr = _to_uint8(arr)
    if photometric == 0:  # MINISWHITE: 0 is white
        arr = 255 - arr
    if arr.ndim == 2:
        return Image.fromarray(arr, "L")
    samples = arr.shape[2]
    alpha = bool(extra) and extra[0] in (1, 2)  # associated or unassociated alpha
    if samples == 2:
        return Image.fromarray(np.ascontiguousarray(arr), "LA") if alpha else \
            Image.fromarray(np.ascontiguousarray(arr[:, :, 0]), "L")
    if photometric != 2:  # not RGB (multispectral, ...): the first channel as grey
        return Image.fromarray(np.ascontiguousarray(arr[:, :, 0]), "L")
    if samples >= 4 and alpha:
        return Image.fromarray(np.ascontiguousarray(arr[:, :, :4]), "RGBA")
    return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), "RGB")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Samples scaled to 0..255: unsigned integers by their type's range (a fixed scale,
    as for 16-bit PNGs, not the brightest pixel), signed ones with negatives cut, floats
    in [0, 1] as they are, other floats (and NaN, inf) by their finite range."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        shift = arr.dtype.itemsize * 8 - 8
        return (arr >> shift).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.signedinteger):
        top = float(np.iinfo(arr.dtype).max)
        scaled: np.ndarray = np.clip(arr, 0, None).astype(np.float64) * (255.0 / top)
        return scaled.astype(np.uint8)
    data = arr.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    span = hi - lo or 1.0
    scaled = np.where(finite, (data - lo) / span, 0.0)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
