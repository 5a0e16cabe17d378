"""Specification of the token estimates (wire/tokens.py, docs/protocol.md §7.5).

Each provider's published image formula on sizes whose token counts are known; the
model name chooses the formula. Text is ~4 characters a token plus 4 per message.
"""

from __future__ import annotations

import pytest

from pipeline.wire.tokens import UNKNOWN_IMAGE_SIZE, image_tokens, text_tokens


@pytest.mark.parametrize("size,tokens", [
    ((1000, 1000), 1334),   # ⌈10⁶ / 750⌉: under both limits (docs/protocol.md §7.5)
    ((200, 200), 54),       # a small image is not scaled up
    ((3136, 784), 820),     # the long edge binds: 1568 × 392 → ⌈614 656 / 750⌉
    ((3000, 3000), 1534),   # 1.15 MP binds: ⌈1 150 000 / 750⌉
])
def test_claude_scales_to_1568_px_and_1_15_megapixels_then_750_pixels_a_token(
        size: tuple[int, int], tokens: int) -> None:
    assert image_tokens("claude-3-5-sonnet-20240620", size) == tokens


@pytest.mark.parametrize("size,tokens", [
    ((1024, 1024), 765),    # 768² → 4 tiles: 85 + 4 × 170 (docs/protocol.md §7.5)
    ((2048, 4096), 1105),   # 1024 × 2048 → 768 × 1536 → 6 tiles
    ((512, 512), 255),      # one tile, not scaled up
    ((100, 3000), 765),     # 2048 cap, then no short-side cut: 68 × 2048 → 1 × 4 tiles
])
def test_gpt_4o_counts_512_px_tiles_at_85_plus_170(size: tuple[int, int],
                                                   tokens: int) -> None:
    assert image_tokens("gpt-4o-2024-08-06", size) == tokens
    assert image_tokens("gpt-4.1", size) == tokens


def test_gpt_4o_mini_counts_the_same_tiles_at_2833_plus_5667() -> None:
    assert image_tokens("gpt-4o-mini", (1024, 1024)) == 2833 + 4 * 5667


@pytest.mark.parametrize("model", ["gpt-5", "o1", "o3-mini", "o4-mini"])
def test_gpt_5_and_the_o_series_count_tiles_at_70_plus_140(model: str) -> None:
    assert image_tokens(model, (1024, 1024)) == 70 + 4 * 140


@pytest.mark.parametrize("size,tokens", [((384, 384), 258), ((385, 200), 258),
                                         ((1536, 768), 516), ((1000, 1000), 1032)])
def test_gemini_is_258_up_to_384_px_then_258_per_768_px_tile(size: tuple[int, int],
                                                             tokens: int) -> None:
    assert image_tokens("gemini-2.0-flash", size) == tokens


def test_an_image_of_unknown_size_counts_as_a_typical_photo() -> None:
    assert image_tokens("claude-3-haiku", None) == image_tokens("claude-3-haiku",
                                                                UNKNOWN_IMAGE_SIZE)


def test_a_zero_sized_image_counts_as_one_pixel() -> None:
    assert image_tokens("claude-3-haiku", (0, 0)) == 1


def test_text_is_a_quarter_token_a_character_plus_4_per_message() -> None:
    assert text_tokens("abcdefgh") == 2 + 4
    assert text_tokens("abcde", None, "") == 2 + 4
    assert text_tokens() == 0
