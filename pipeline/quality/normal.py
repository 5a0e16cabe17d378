"""Caption text as the checks compare it (repeats, banned phrases)."""

from __future__ import annotations

import unicodedata

__all__ = ["normalized"]


def normalized(text: str) -> str:
    """The text as repeats are counted: case, spacing and outer punctuation ignored."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split()).strip(" .!?,;:\"'“”")
