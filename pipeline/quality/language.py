"""Which language a caption is in: py3langid, loaded once, answered in microseconds.

Why py3langid (a maintained fork of langid.py): its model ships inside the 4.6 MB wheel
(no download at run time, so it works offline and in CI), it is deterministic (the same
caption gets the same verdict on every run: langdetect is random unless seeded), it
needs only NumPy, which pyarrow already brings, and it classifies a caption in ~25 µs.
Lingua is more accurate on a few words, but its wheel is 96 MB; captions are sentences.

A short text says little about its language, so the verdict is "another language"
only when the detector is sure (``CONFIDENT``) and the text has ``MIN_WORDS`` words;
anything less passes (docs/protocol.md §19.3).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from ..errors import RunFatal

__all__ = ["CONFIDENT", "MIN_WORDS", "check_code", "detect", "language_name"]

CONFIDENT = 0.8
MIN_WORDS = 4
_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese",
    "ko": "Korean", "pl": "Polish", "sv": "Swedish", "da": "Danish", "no": "Norwegian",
    "fi": "Finnish", "tr": "Turkish", "cs": "Czech", "uk": "Ukrainian", "ar": "Arabic",
    "hi": "Hindi", "el": "Greek", "he": "Hebrew", "id": "Indonesian", "vi": "Vietnamese",
    "th": "Thai", "hu": "Hungarian", "ro": "Romanian", "ca": "Catalan", "gl": "Galician",
}
_lock = threading.Lock()


@functools.cache
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def codes() -> tuple[str, ...]:
    with _lock:
        return tuple(_identifier().nb_classes)


def check_code(code: str) -> None:
    """Exit 2 for a language the detector does not know (naming close ones)."""
    known = codes()
    if code not in known:
        close = [c for c in known if c[:1] == code[:1]][:8]
        raise RunFatal(f"--quality-language {code!r} is not an ISO 639-1 code the "
                       f"detector knows (e.g. en, de, fr; starting alike: "
                       f"{', '.join(close) or 'none'})", "config", exit_code=2)


def language_name(code: str) -> str:
    return _NAMES.get(code, code)


def detect(text: str, words: int) -> tuple[str, float] | None:
    """(language, probability) when the text is long enough to tell, else None."""
    if words < MIN_WORDS:
        return None
    with _lock:  # the identifier keeps per-call buffers: one caller at a time
        code, prob = _identifier().classify(text[:2000])
    return str(code), float(prob)
