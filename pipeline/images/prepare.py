"""Decide what is actually sent for one image: pure Pillow work, run in a thread pool.

An image that the provider takes as it is (accepted format, upright, one frame,
long edge within ``max_edge``, payload within ``max_bytes``) is sent byte for byte.
Anything else is decoded once and re-encoded: EXIF orientation applied, first frame
only, 16-bit / CMYK / palette / bilevel converted, long edge cut to ``max_edge``
(never enlarged), alpha kept in PNG or composited on white for JPEG, and quality
then size stepped down until the base64 payload fits. Large JPEGs are decoded at
reduced size by the DCT (``draft``), which is most of the speed.

Nothing here does I/O or knows of asyncio or HTTP: bytes in, ``Prepared`` out, or
an ``ImageProblem`` with a readable reason.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImagePolicy", "Prepared", "ImageProblem", "prepare", "sniff_mime", "b64_len"]

# Providers' common ground (docs/protocol.md §7.4): Claude, OpenAI and Gemini all take these.
ACCEPTED = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
         "TIFF": "image/tiff", "BMP": "image/bmp", "MPO": "image/jpeg"}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
# Bigger than any camera: Pillow's own limit (its default MAX_IMAGE_PIXELS, left as it
# is: this module changes no global of Pillow's), which it checks on open, before
# anything is decoded; above twice that it refuses, in between it only warns, and the
# CLI silences that warning once for the process (logs.setup_logging).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageProblem(Exception):
    """The bytes cannot become an acceptable image; the message says why."""


@dataclass(frozen=True)
class ImagePolicy:
    max_edge: int = 1568
    max_bytes: int = 5 * 1024 * 1024   # measured on the base64 text, as Claude does
    jpeg_quality: int = 85
    accepted: frozenset[str] = ACCEPTED


@dataclass(frozen=True)
class Prepared:
    data: bytes
    mime: str
    width: int          # original, after orientation
    height: int
    sent_width: int
    sent_height: int
    sha256: str         # of the original bytes
    reencoded: bool


def b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)


def sniff_mime(head: bytes) -> str | None:
    """Media type from magic numbers; None when the bytes are no image we know."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if head[:2] == b"BM":
        return "image/bmp"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "image/heic" if b"hei" in head[8:12] else "image/avif"
    return None


def prepare(data: bytes, policy: ImagePolicy) -> Prepared:
    if not data:
        raise ImageProblem("empty file (0 bytes)")
    sha = hashlib.sha256(data).hexdigest()
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageProblem(_unreadable(data, e)) from None
    except Image.DecompressionBombError as e:
        raise ImageProblem(f"image too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageProblem(f"corrupt {sniff_mime(data[:16]) or ''} image ({e})") from None
    with im:
        if im.width * im.height > MAX_PIXELS:
            raise ImageProblem(f"image too large to decode safely ({im.width}x{im.height} "
                               f"pixels > {MAX_PIXELS})")
        orientation = _orientation(im)
        w, h = im.size
        if orientation in _ROTATED:
            w, h = h, w
        mime = _MIME.get(im.format or "", sniff_mime(data[:16]) or "")
        if _fits(im, mime, orientation, w, h, data, policy):
            return Prepared(data, mime, w, h, w, h, sha, False)
        try:
            out, out_mime, sw, sh = _reencode(im, orientation, policy)
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageProblem(f"corrupt or truncated {mime} image ({e})") from None
    return Prepared(out, out_mime, w, h, sw, sh, sha, True)


def _unreadable(data: bytes, e: Exception) -> str:
    kind = sniff_mime(data[:16])
    if kind:
        return f"{kind} image that cannot be decoded (unsupported variant or corrupt)"
    return "not an image (unrecognised content)"


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make the image unusable
        return 1


def _fits(im: Image.Image, mime: str, orientation: int, w: int, h: int, data: bytes,
          policy: ImagePolicy) -> bool:
    return (mime in policy.accepted and orientation in (0, 1) and max(w, h) <= policy.max_edge
            and b64_len(len(data)) <= policy.max_bytes and getattr(im, "n_frames", 1) == 1
            and im.mode in ("RGB", "RGBA", "L", "LA", "P", "1") and _complete(mime, data))


def _complete(mime: str, data: bytes) -> bool:
    """A cheap check that a file sent untouched is whole: its format's end marker.

    A truncated file fails it and goes through the decoder, which names the problem.
    """
    tail = data.rstrip(b"\x00")[-16:]
    if mime == "image/jpeg":
        return tail.endswith(b"\xff\xd9")
    if mime == "image/png":
        return b"IEND" in tail
    if mime == "image/gif":
        return tail.endswith(b";")
    if mime == "image/webp":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return False


def _reencode(im: Image.Image, orientation: int, policy: ImagePolicy
              ) -> tuple[bytes, str, int, int]:
    edge = policy.max_edge
    if im.format == "JPEG":
        # Decode at 1/2, 1/4 or 1/8 size straight from the DCT: the big saving on photos.
        r = min(1.0, edge / max(im.size))
        im.draft(im.mode if im.mode in ("RGB", "L") else None,
                 (max(1, round(im.width * r)), max(1, round(im.height * r))))
    im.seek(0)  # first frame of an animation or a multi-page TIFF
    im.load()
    frame = _to_8bit(im)
    if orientation in _TRANSPOSE:
        frame = frame.transpose(_TRANSPOSE[orientation])
    # Bicubic, as Pillow's own thumbnail: antialiased for downscaling, and after the draft
    # decode there is at most a factor of 2 left, so no reducing pass is needed.
    frame.thumbnail((edge, edge), Image.Resampling.BICUBIC, reducing_gap=None)
    return _encode_to_fit(frame, policy)


def _to_8bit(im: Image.Image) -> Image.Image:
    """A mode JPEG or PNG can hold: 16-bit scaled down, CMYK/YCbCr to RGB, palette resolved."""
    if im.mode.startswith("I;16"):  # 16-bit samples: a fixed scale, not the brightest pixel
        arr = np.asarray(im, dtype=np.uint16)
        return Image.fromarray((arr // 257).astype(np.uint8), "L")
    if im.mode == "I":  # 32-bit integers, in practice 16-bit data widened by the decoder
        arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        return Image.fromarray((arr // 257).astype(np.uint8), "L")
    if im.mode == "F":
        return im.convert("L")
    if im.mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGB", "RGBA", "L", "LA"):
        return im
    if im.mode == "1":
        return im.convert("L")
    if im.mode == "PA":
        return im.convert("RGBA")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _encode_to_fit(frame: Image.Image, policy: ImagePolicy) -> tuple[bytes, str, int, int]:
    """PNG when alpha matters and it fits; else JPEG, stepping quality then size down."""
    if frame.mode in ("RGBA", "LA") and _has_transparency(frame):
        data = _save(frame, "PNG")
        if b64_len(len(data)) <= policy.max_bytes:
            return data, "image/png", *frame.size
        frame = _on_white(frame)
    elif frame.mode in ("RGBA", "LA"):
        frame = frame.convert("RGB" if frame.mode == "RGBA" else "L")
    quality = policy.jpeg_quality
    while True:
        data = _save(frame, "JPEG", quality=quality, optimize=False)
        if b64_len(len(data)) <= policy.max_bytes:
            return data, "image/jpeg", *frame.size
        if quality > 60:
            quality -= 10
        elif min(frame.size) > 16:
            frame = frame.resize((max(1, frame.width * 3 // 4), max(1, frame.height * 3 // 4)),
                                 Image.Resampling.LANCZOS)
        else:
            raise ImageProblem(f"cannot fit the image under {policy.max_bytes} bytes")


def _has_transparency(frame: Image.Image) -> bool:
    lo, _ = cast(tuple[int, int], frame.getchannel("A").getextrema())  # one band: (min, max)
    return lo < 255


def _on_white(frame: Image.Image) -> Image.Image:
    rgba = frame.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _save(frame: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    frame.save(buf, fmt, **options)
    return buf.getvalue()
