"""Image references → what is sent: a base64 ``data:`` URI for local files, URLs as given.

The media type comes from the file's first bytes, never its extension. Local files
are read and encoded in a worker thread so the event loop keeps streaming. Every
local problem (missing, unreadable, empty, not an image, a format the provider does
not take, over the byte limit) is a ``RowFailed`` with class ``bad_image``.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import RowFailed
from .records import ManifestRow, PreparedImage

__all__ = ["ImageSource", "sniff_mime"]

# The formats Claude, OpenAI and Gemini all take (protocol-reference 6).
ACCEPTED = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


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


def b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)


class ImageSource:
    """Resolves a manifest row's ``image`` into a ``PreparedImage``."""

    def __init__(self, base_dir: Path, max_image_bytes: int) -> None:
        self.base_dir = base_dir
        self.max_image_bytes = max_image_bytes

    async def load(self, row: ManifestRow) -> PreparedImage:
        ref = row.image
        if ref.lower().startswith(("http://", "https://")):
            return PreparedImage(ref, None, None)
        return await asyncio.to_thread(self._load_local, ref)

    def resolve(self, ref: str) -> Path:
        p = Path(ref).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def _load_local(self, ref: str) -> PreparedImage:
        path = self.resolve(ref)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RowFailed(f"image file not found: {path}", "bad_image") from None
        except IsADirectoryError:
            raise RowFailed(f"image path is a directory: {path}", "bad_image") from None
        except OSError as e:
            raise RowFailed(f"image file unreadable: {path} ({e.strerror})", "bad_image") from None
        if not data:
            raise RowFailed(f"image file is empty (0 bytes): {path}", "bad_image")
        mime = sniff_mime(data[:16])
        if mime is None:
            raise RowFailed(f"not an image (unrecognised content): {path}", "bad_image")
        if mime not in ACCEPTED:
            raise RowFailed(f"image format {mime} is not accepted by the provider "
                            f"(JPEG, PNG, GIF, WebP): {path}", "bad_image")
        size = b64_len(len(data))
        if size > self.max_image_bytes:
            raise RowFailed(f"image too large: {size} bytes as base64 > limit "
                            f"{self.max_image_bytes}: {path}", "bad_image")
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                width, height = im.size
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise RowFailed(f"corrupt or unreadable {mime} image: {path} ({e})",
                            "bad_image") from None
        uri = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
        return PreparedImage(uri, mime, len(data), width, height)
