"""The checks of one caption: pure functions of its text, each a ``Flag`` or None.

A flag has a name (the ``quality_flags`` column), a note for people (``quality_notes``,
the error message under ``policy = "error"``) and the instruction a re-ask sends: what
was wrong, measured, and what to do instead ("Your answer was 212 words; answer in at
most 60."), so the model gets one targeted chance (docs/protocol.md §19).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..wire.response import first_mismatch
from .config import QualitySettings
from .language import CONFIDENT, detect, language_name
from .normal import normalized
from .refusal import find_refusal, word_count

__all__ = ["SCAN_CHARS", "Flag", "TextChecks", "normalized"]

SCAN_CHARS = 16_384  # of a caption's text, read by the checks other than its length


@dataclass(frozen=True)
class Flag:
    name: str
    note: str
    instruction: str


# Text that is no caption at all: a placeholder, or an introduction with nothing after.
_PLACEHOLDER = re.compile(
    r"^\W*(?:n/?a|none|null|nil|empty|untitled|no caption|no description|caption|"
    r"description|image|an? image|an? picture|an? photo(?:graph)?|picture|photo|"
    r"lorem ipsum\b.*|todo|tbd|\[[^\]]*\]|<[^>]*>|\{[^}]*\})\W*$", re.I | re.S)
_PREAMBLE = re.compile(
    r"^\W*(?:sure|certainly|of course|absolutely|okay|ok|here(?:'s| is| are)|below is|"
    r"the following is)\b[^.:\n]{0,80}?(?:caption|description|answer)?[^.:\n]{0,40}[:.!]",
    re.I)
# A caption has a letter or a digit: a zero-width space, a dash or an emoji is none.
_LETTER = re.compile(r"[^\W_]")
_CLOSING = re.compile(r"(?:let me know if|i hope this helps|feel free to ask|is there "
                      r"anything else)[^.!?]*[.!?]?\s*$", re.I)


class Size(NamedTuple):
    """A caption's whole length: words and characters."""

    words: int
    chars: int


class TextChecks:
    """The checks ``QualitySettings`` turns on, in the order flags are reported."""

    def __init__(self, q: QualitySettings) -> None:
        self.q = q
        # The schema as the validator cache keys it: serialized once, not per caption.
        self._schema_text = None if q.json_schema is None else \
            json.dumps(q.json_schema, sort_keys=True)
        self._banned = [(p, re.compile(r"(?<!\w)" + re.escape(normalized(p)) + r"(?!\w)"))
                        for p in q.banned_phrases]
        self.checks: list[Callable[[str, Size, str], Flag | None]] = []
        if q.refusal:
            self.checks.append(self._refusal)
        if q.boilerplate:
            self.checks.append(self._boilerplate)
        if q.min_words or q.max_words:
            self.checks.append(self._words)
        if q.min_chars or q.max_chars:
            self.checks.append(self._chars)
        if self._banned:
            self.checks.append(self._banned_phrase)
        if q.language:
            self.checks.append(self._language)

    def run(self, text: str, caption_json: str | None) -> list[Flag]:
        """Every failed check. A JSON caption is judged by the text of its strings
        ({"caption": "I'm sorry, ..."} is a refusal too)."""
        source = caption_json if caption_json is not None else text
        # Parsed once, for its strings and for the schema; plain text without a schema
        # is never parsed.
        jsonish = caption_json is not None or self._schema_text is not None
        doc = _parse(source) if jsonish else _NOT_JSON
        prose = _strings(doc) if caption_json is not None and doc is not _NOT_JSON else source
        flags = self._text_flags(prose)
        if self._schema_text is not None:
            flag = self._schema(doc, self._schema_text)
            if flag:
                flags.append(flag)
        return flags

    def _text_flags(self, text: str) -> list[Flag]:
        """Lengths are measured on the whole text; the other checks read its first
        ``SCAN_CHARS`` (a refusal opens the answer; a caption longer than that is no
        caption to train on), so only the length counts read a runaway answer whole."""
        head = text[:SCAN_CHARS]
        size = Size(word_count(text), len(text.strip()))
        norm = normalized(head)
        return [f for check in self.checks if (f := check(head, size, norm))]

    def _refusal(self, text: str, size: Size, norm: str) -> Flag | None:
        found = find_refusal(text)
        if found is None:
            return None
        return Flag("refusal", f"reads as a refusal: {found.clause[:120]!r}",
                    "Your previous answer declined the task. This image is part of a "
                    "dataset being captioned: describe what is visible in it (without "
                    "naming or identifying any person), as asked.")

    def _boilerplate(self, text: str, size: Size, norm: str) -> Flag | None:
        stripped = _PREAMBLE.sub("", text, count=1).strip()
        if not norm or _PLACEHOLDER.match(text.strip()) or not _LETTER.search(stripped):
            return Flag("boilerplate", f"no caption, only {text.strip()[:60]!r}",
                        "Your previous answer was not a caption. Answer with the caption "
                        "of the image itself.")
        if stripped != text.strip() or _CLOSING.search(text):
            return Flag("boilerplate", "the caption is wrapped in chat (an introduction "
                                       "or a closing line)",
                        "Answer with the caption text only: no introduction such as "
                        "'Here is a caption', no closing remarks.")
        return None

    def _words(self, text: str, size: Size, norm: str) -> Flag | None:
        return _bound("words", size.words, self.q.min_words, self.q.max_words)

    def _chars(self, text: str, size: Size, norm: str) -> Flag | None:
        return _bound("characters", size.chars, self.q.min_chars, self.q.max_chars)

    def _banned_phrase(self, text: str, size: Size, norm: str) -> Flag | None:
        hits = [p for p, pattern in self._banned if pattern.search(norm)]
        if not hits:
            return None
        said = ", ".join(repr(h) for h in hits[:5])
        return Flag("banned_phrase", f"uses {said}",
                    f"Your previous answer used {said}. Answer again without "
                    f"{'it' if len(hits) == 1 else 'them'}.")

    def _language(self, text: str, size: Size, norm: str) -> Flag | None:
        want = self.q.language or ""
        found = detect(text, size.words)
        if found is None or found[0] == want or found[1] < CONFIDENT:
            return None
        got = language_name(found[0])
        return Flag("language", f"in {got} ({found[0]}, p={found[1]:.2f}), not "
                                f"{language_name(want)} ({want})",
                    f"Your previous answer was in {got}; answer in {language_name(want)}.")

    @staticmethod
    def _schema(doc: Any, schema_text: str) -> Flag | None:
        if doc is _NOT_JSON:
            return Flag("json_schema", "not JSON", "Your previous answer was not JSON. "
                        "Answer with one JSON value that matches the required schema.")
        problem = first_mismatch(schema_text, doc)
        if problem is None:
            return None
        return Flag("json_schema", f"does not match the schema ({problem})",
                    f"Your previous answer did not match the required JSON schema "
                    f"({problem}). Answer with JSON that matches it.")


_NOT_JSON = object()  # what _parse gives for text that is not JSON


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _strings(doc: Any) -> str:
    """The strings of a JSON caption, in document order, as one text."""
    out: list[str] = []
    stack = [doc]
    while stack and len(out) < 10_000:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return " ".join(out)


def _bound(unit: str, n: int, low: int | None, high: int | None) -> Flag | None:
    if high is not None and n > high:
        return Flag("too_long", f"{n} {unit}, more than {high}",
                    f"Your answer was {n} {unit}; answer in at most {high}.")
    if low is not None and n < low:
        return Flag("too_short", f"{n} {unit}, fewer than {low}",
                    f"Your answer was {n} {unit}; answer in at least {low}, describing "
                    "more of the image.")
    return None
