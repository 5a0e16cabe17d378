"""The "model" half of the local gateway SIMULATOR: no model runs here.

Owns what the simulated model sees and says: it turns the messages of an OpenAI or
Anthropic request into a neutral `Prompt` (decoding each image with Pillow), prices
the prompt the way Claude counts tokens, writes a deterministic caption from the real
image (size, mode, format, dominant colours, where it is brighter) and cuts a caption
into ~4-character pieces that stand in for streamed tokens.

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a parsing bug in the client must not be mirrored by the server it is tested against.
The HTTP side lives in `simulator.app`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlparse

from PIL import Image, ImageStat

__all__ = [
    "BadRequest",
    "ImageInfo",
    "InvalidImage",
    "Prompt",
    "caption_for",
    "claude_image_tokens",
    "inspect_image",
    "parse_anthropic_messages",
    "parse_openai_messages",
    "split_tokens",
]

# Claude's native resolution (docs/protocol.md §7.1): larger images are scaled down,
# aspect kept, before they are priced at w*h/750 tokens.
MAX_LONG_EDGE = 1568
MAX_PIXELS = 1_150_000
PIXELS_PER_TOKEN = 750
# Text is priced at ~4 characters a token plus a small per-message framing cost.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
# http(s) images are never fetched; they are priced as if they were this size.
URL_IMAGE_SIZE = (1024, 768)
ANTHROPIC_MEDIA_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
# Pillow names multi-picture camera JPEGs "MPO"; on the wire they are plain image/jpeg.
_FORMAT_MIME = {"MPO": "image/jpeg"}

NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark grey": (64, 64, 64),
    "grey": (128, 128, 128),
    "silver": (192, 192, 192),
    "white": (255, 255, 255),
    "red": (200, 30, 30),
    "maroon": (128, 0, 0),
    "brown": (139, 90, 43),
    "orange": (255, 140, 0),
    "beige": (225, 205, 160),
    "yellow": (240, 220, 40),
    "olive": (128, 128, 0),
    "green": (40, 160, 40),
    "teal": (0, 128, 128),
    "blue": (40, 80, 200),
    "navy": (0, 0, 110),
    "purple": (128, 40, 160),
    "pink": (240, 150, 190),
}
MODE_NAMES = {"L": "greyscale", "LA": "greyscale", "1": "black-and-white", "P": "palette"}


class BadRequest(ValueError):
    """The request is malformed; the message is safe to send back to the client."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidImage(BadRequest):
    """An image could not be decoded (OpenAI answers "Invalid image.")."""


@dataclass(frozen=True)
class ImageInfo:
    """What the simulator learned from one image (or assumed, for a URL)."""

    fmt: str
    width: int
    height: int
    mode: str
    colours: tuple[str, ...]
    light: str
    contrast: str
    digest: str
    source: str  # "data" when decoded, or the URL's basename when not fetched

    @property
    def tokens(self) -> int:
        return claude_image_tokens(self.width, self.height)


@dataclass(frozen=True)
class Prompt:
    """A request reduced to what the simulated model reads: text and images."""

    text: str
    images: tuple[ImageInfo, ...]
    messages: int
    followup: bool = False  # an earlier answer of the model is in the request (a re-ask)

    @property
    def tokens(self) -> int:
        text_tokens = math.ceil(len(self.text) / CHARS_PER_TOKEN)
        framing = TOKENS_PER_MESSAGE * self.messages
        return text_tokens + framing + sum(image.tokens for image in self.images)


# ---------------------------------------------------------------- pricing


def scaled_size(width: int, height: int) -> tuple[int, int]:
    """The size Claude would see: long edge <= 1568 px and area <= 1.15 MP."""
    scale = min(1.0, MAX_LONG_EDGE / max(width, height), math.sqrt(MAX_PIXELS / (width * height)))
    if scale >= 1.0:
        return width, height
    # The epsilon keeps an exact fit (e.g. 3136 -> 1568) from flooring one pixel short.
    return max(1, math.floor(width * scale + 1e-9)), max(1, math.floor(height * scale + 1e-9))


def claude_image_tokens(width: int, height: int) -> int:
    w, h = scaled_size(width, height)
    return math.ceil(w * h / PIXELS_PER_TOKEN)


# ---------------------------------------------------------------- images


def decode_data_uri(url: str) -> bytes:
    """Bytes of a `data:<mime>;base64,<payload>` URI, or InvalidImage."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise InvalidImage("Invalid image.")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("Invalid image.") from None
    if not data:
        raise InvalidImage("Invalid image.")
    return data


def inspect_image(data: bytes) -> ImageInfo:
    """Decode real image bytes and describe them; InvalidImage if Pillow cannot."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height), mode = image.format or "image", image.size, image.mode
            # draft() lets JPEG decode at reduced scale: the simulator only needs a thumbnail.
            image.draft("RGB", (128, 128))
            thumb = _flatten(image)
            thumb.thumbnail((64, 64))
    except Exception:  # Pillow raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise InvalidImage("Invalid image.") from None
    grey = thumb.convert("L")
    return ImageInfo(
        fmt=fmt, width=width, height=height, mode=mode,
        colours=_dominant_colours(thumb), light=_light_hint(grey),
        contrast=_contrast(grey), digest=hashlib.sha256(data).hexdigest(), source="data",
    )  # fmt: skip


def url_image(url: str) -> ImageInfo:
    """A URL image is never fetched: describe it from its name, price it at 1024x768."""
    name = unquote(urlparse(url).path.rsplit("/", 1)[-1]) or urlparse(url).netloc or "a URL"
    width, height = URL_IMAGE_SIZE
    digest = hashlib.sha256(url.encode()).hexdigest()
    return ImageInfo("URL", width, height, "unknown", (), "", "", digest, name)


def _flatten(image: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels are shown over white, as a viewer would."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _dominant_colours(thumb: Image.Image) -> tuple[str, ...]:
    """Two or three colour names covering most of the (quantized) thumbnail."""
    quantized = thumb.quantize(colors=8)
    palette: list[int] = quantized.getpalette() or []
    shares: Counter[str] = Counter()
    for count, index in quantized.getcolors() or []:
        i = int(cast(int, index))  # a "P" image's colours are palette indices
        rgb = tuple(palette[3 * i : 3 * i + 3])
        shares[_nearest_colour(rgb)] += count
    total = sum(shares.values()) or 1
    # Ties are broken by name so the result never depends on dict order.
    ranked = sorted(shares.items(), key=lambda item: (-item[1], item[0]))
    names = [name for i, (name, count) in enumerate(ranked) if i < 2 or count / total >= 0.1]
    return tuple(names[:3])


def _nearest_colour(rgb: tuple[int, ...]) -> str:
    def distance(name: str) -> int:
        return sum((a - b) ** 2 for a, b in zip(rgb, NAMED_COLOURS[name], strict=True))

    return min(NAMED_COLOURS, key=distance)


def _light_hint(grey: Image.Image) -> str:
    """Where the image is brighter, from the mean luminance of its halves."""
    w, h = grey.size
    halves = {
        "top": (0, 0, w, max(1, h // 2)), "bottom": (0, h // 2, w, h),
        "left": (0, 0, max(1, w // 2), h), "right": (w // 2, 0, w, h),
    }  # fmt: skip
    mean = {side: ImageStat.Stat(grey.crop(box)).mean[0] for side, box in halves.items()}
    vertical, horizontal = mean["top"] - mean["bottom"], mean["left"] - mean["right"]
    if max(abs(vertical), abs(horizontal)) < 8:
        return "even lighting across the frame"
    if abs(vertical) >= abs(horizontal):
        return f"brighter areas toward the {'top' if vertical > 0 else 'bottom'}"
    return f"brighter areas toward the {'left' if horizontal > 0 else 'right'}"


def _contrast(grey: Image.Image) -> str:
    spread = ImageStat.Stat(grey).stddev[0]
    return "high" if spread > 64 else "moderate" if spread > 32 else "low"


# ---------------------------------------------------------------- request bodies


def parse_openai_messages(messages: Any) -> Prompt:
    """Chat Completions `messages`: string content or text / image_url parts."""
    texts: list[str] = []
    images: list[ImageInfo] = []
    for position, message in enumerate(_message_list(messages)):
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{position}].content must be a string or an array")
        for part in content:
            _openai_part(part, texts, images, position)
    return Prompt(" ".join(texts), tuple(images), len(messages), _answered(messages))


def _openai_part(part: Any, texts: list[str], images: list[ImageInfo], position: int) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        texts.append(part["text"])
    elif kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str):
            raise BadRequest(f"messages[{position}]: image_url.url must be a string")
        images.append(_image_from_url(url))
    else:
        raise BadRequest(f"messages[{position}].content: unsupported part type {kind!r}")


def _image_from_url(url: str) -> ImageInfo:
    if url.startswith(("http://", "https://")):
        return url_image(url)
    return inspect_image(decode_data_uri(url))


def parse_anthropic_messages(system: Any, messages: Any) -> Prompt:
    """Messages API: top-level `system`, string content or text / image blocks."""
    texts = [_anthropic_system(system)] if system else []
    images: list[ImageInfo] = []
    for position, message in enumerate(_message_list(messages)):
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise BadRequest(f"messages.{position}.content: Input should be a valid list")
        for index, block in enumerate(blocks):
            where = f"messages.{position}.content.{index}"
            _anthropic_block(block, texts, images, where)
    return Prompt(" ".join(texts), tuple(images), len(messages) + (1 if system else 0),
                  _answered(messages))


def _anthropic_system(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return " ".join(b.get("text", "") for b in system if isinstance(b, dict))
    raise BadRequest("system: Input should be a valid string or list")


def _anthropic_block(block: Any, texts: list[str], images: list[ImageInfo], where: str) -> None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text" and isinstance(block.get("text"), str):
        texts.append(block["text"])
    elif kind == "image":
        images.append(_anthropic_image(block.get("source"), where))
    else:
        raise BadRequest(f"{where}: unsupported content block type {kind!r}")


def _anthropic_image(source: Any, where: str) -> ImageInfo:
    """Decode a base64 source strictly, with the messages the real API uses."""
    if isinstance(source, dict) and source.get("type") == "url":
        return url_image(str(source.get("url", "")))
    if not isinstance(source, dict) or source.get("type") != "base64":
        raise BadRequest(f"{where}.image.source: unsupported source type")
    media_type = source.get("media_type")
    if media_type not in ANTHROPIC_MEDIA_TYPES:
        raise BadRequest(f"{where}.image.source.base64.media_type: unsupported {media_type!r}")
    try:
        data = base64.b64decode(str(source.get("data", "")), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"{where}.image.source.base64: Invalid base64 data") from None
    info = inspect_image(data) if data else None
    if info is None:
        raise InvalidImage(f"{where}.image.source.base64: image cannot be empty")
    if _FORMAT_MIME.get(info.fmt, f"image/{info.fmt.lower()}") != media_type:
        # The real API checks the declared type against the bytes; so does the simulator.
        message = f"Image does not match the provided media type {media_type}"
        raise InvalidImage(f"{where}.image.source.base64: {message}")
    return info


def _answered(messages: list[Any], role: str = "assistant") -> bool:
    return any(isinstance(m, dict) and m.get("role") == role for m in messages)


def _message_list(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise BadRequest("each message must be an object", "messages")
    return messages


# ---------------------------------------------------------------- captions

_TEMPLATES = (
    "A {size} {mode} {fmt} {noun} dominated by {colours} tones, with {light}.",
    "{Colours} tones dominate this {size} {mode} {fmt} {noun}, with {light}.",
    "With {light}, this {size} {mode} {fmt} {noun} is mostly {colours}.",
)
_NOUNS = ("photograph", "image", "picture", "scene")


def caption_for(prompt: Prompt, seed: int, variant: int = 0) -> str:
    """Deterministic for (images, prompt text, seed, variant); differs across images."""
    if not prompt.images:
        return "There is no image in this request to describe."
    key = "|".join([str(seed), prompt.text, *(image.digest for image in prompt.images)])
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    sentences = [_describe(image, rng, variant) for image in prompt.images]
    if variant >= len(_TEMPLATES):
        sentences.append(f"(Alternative {variant + 1}.)")
    return " ".join(sentences)


def _describe(image: ImageInfo, rng: random.Random, variant: int) -> str:
    noun = rng.choice(_NOUNS)
    if image.source != "data":
        return f"An image from {image.source}, not fetched by the simulator."
    colours = _join_names(image.colours)
    sentence = _TEMPLATES[variant % len(_TEMPLATES)].format(
        size=f"{image.width}x{image.height}", mode=MODE_NAMES.get(image.mode, image.mode),
        fmt=image.fmt, noun=noun, colours=colours, Colours=colours[:1].upper() + colours[1:],
        light=image.light,
    )  # fmt: skip
    if rng.random() < 0.5:
        sentence += f" The overall contrast is {image.contrast}."
    return sentence


def _join_names(names: tuple[str, ...]) -> str:
    if len(names) <= 1:
        return names[0] if names else "neutral"
    return ", ".join(names[:-1]) + " and " + names[-1]


_WORDS = re.compile(r"\s*\S+|\s+$")


def split_tokens(text: str) -> list[str]:
    """Word pieces of at most 4 visible characters; "".join(pieces) == text."""
    pieces: list[str] = []
    for word in _WORDS.findall(text):
        body = word.lstrip()
        lead = word[: len(word) - len(body)]
        chunks = [body[i : i + CHARS_PER_TOKEN] for i in range(0, len(body), CHARS_PER_TOKEN)]
        chunks = chunks or [""]
        pieces.append(lead + chunks[0])
        pieces.extend(chunks[1:])
    return pieces
