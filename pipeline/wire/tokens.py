"""Token estimates made before a request is sent, for the token budgets.

The image cost follows the provider's published formula for the image actually sent
(docs/protocol.md §7.5), chosen by model name; text is ~4 characters a token.
Estimates only need to be close: the limiter reconciles each one with the usage the
server reports, so errors never accumulate.
"""

from __future__ import annotations

import math

__all__ = ["image_tokens", "text_tokens", "thinking_tokens", "UNKNOWN_IMAGE_SIZE"]

# URLs are passed through unseen; assume a typical photo after provider downscaling.
UNKNOWN_IMAGE_SIZE = (1092, 1092)


def _claude(w: int, h: int) -> int:
    # Claude downsizes to a long edge of 1568 px and ~1.15 MP, then ~w*h/750 tokens.
    scale = min(1.0, 1568 / max(w, h), math.sqrt(1_150_000 / (w * h)))
    return math.ceil((w * scale) * (h * scale) / 750)


def _openai_tiles(w: int, h: int, base: int, per_tile: int) -> int:
    # Fit in 2048x2048, then shortest side to 768, then count 512-px tiles.
    s = min(1.0, 2048 / max(w, h))
    w2, h2 = w * s, h * s
    s = min(1.0, 768 / min(w2, h2))
    w2, h2 = w2 * s, h2 * s
    return base + per_tile * math.ceil(w2 / 512) * math.ceil(h2 / 512)


def _openai_rates(m: str) -> tuple[int, int] | None:
    """(base, per 512-px tile) of OpenAI's vision models; None for other models."""
    if "gpt-4o-mini" in m:
        return 2833, 5667
    if any(k in m for k in ("gpt-4o", "gpt-4.1", "chatgpt")):
        return 85, 170
    if "gpt-5" in m or m.startswith(("o1", "o3", "o4")):
        return 70, 140
    return None


def _gemini(w: int, h: int) -> int:
    if w <= 384 and h <= 384:
        return 258
    return 258 * math.ceil(w / 768) * math.ceil(h / 768)


def image_tokens(model: str, size: tuple[int, int] | None, detail: str | None = None) -> int:
    """``detail`` (OpenAI-style image parts): ``low`` costs the base alone, whatever the
    size; ``high`` and ``auto`` (which the server may resolve to high) the tiles too."""
    w, h = size or UNKNOWN_IMAGE_SIZE
    w, h = max(1, w), max(1, h)
    m = model.lower()
    rates = _openai_rates(m)
    if rates is not None:
        base, per_tile = rates
        return base if detail == "low" else _openai_tiles(w, h, base, per_tile)
    if "gemini" in m:
        return _gemini(w, h)
    return _claude(w, h)


def text_tokens(*texts: str | None) -> int:
    return sum(math.ceil(len(t) / 4) + 4 for t in texts if t)


# Reasoning tokens a thinking model typically spends on one image caption, by effort
# (docs/protocol.md §14.3): orders of magnitude for the dry run's warning, not a bill.
_THINKING = {"none": 0, "minimal": 128, "low": 512, "medium": 2048, "high": 8192}
_THINKERS = ("gpt-5", "o1", "o3", "o4", "gemini-2.5", "gemini-3", "think", "reasoner", "qwq")


def thinking_tokens(model: str, effort: str | None) -> int:
    """What ``model`` is known to spend thinking at ``effort`` (0: not a known thinking
    model, or thinking off). A Claude model thinks only when an effort is asked."""
    m = model.lower()
    if "claude" in m:
        return _THINKING.get(effort, 0) if effort else 0
    if "gpt-5-chat" in m or not any(k in m for k in _THINKERS):
        return 0
    return _THINKING[effort or "medium"]
