"""What the quality gate checks: one frozen value, validated when built (exit 2 if not)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import RunFatal
from .normal import normalized

__all__ = ["POLICIES", "QualitySettings", "load_schema"]

POLICIES = ("flag", "error")
# Up to this many distinct caption texts are remembered exactly (about 92 bytes
# each); past it, texts seen once are forgotten (docs/protocol.md §19.4).
REPEATS_CAP = 500_000


def _bad(message: str) -> RunFatal:
    return RunFatal(message, "config", exit_code=2)


@dataclass(frozen=True)
class QualitySettings:
    """The ``[quality]`` table / ``--quality-*`` options.

    ``refusal`` and ``boilerplate`` are on by default (they cost nothing and a refusal
    is never a caption); the others are off until given. ``reask``: one follow-up turn
    per failed row; ``policy`` decides what a row that still fails becomes."""

    refusal: bool = True
    boilerplate: bool = True
    min_words: int | None = None
    max_words: int | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    banned_phrases: tuple[str, ...] = ()
    language: str | None = None
    json_schema: dict[str, Any] | None = None
    json_schema_path: str | None = None
    max_repeats: int | None = None
    policy: str = "flag"
    reask: bool = True

    def __post_init__(self) -> None:
        for name in ("min_words", "max_words", "min_chars", "max_chars", "max_repeats"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise _bad(f"--quality-{name.replace('_', '-')} must be 1 or more, "
                           f"got {value}")
        for low, high in (("min_words", "max_words"), ("min_chars", "max_chars")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise _bad(f"--quality-{low.replace('_', '-')} {lo} is above "
                           f"--quality-{high.replace('_', '-')} {hi}")
        if self.policy not in POLICIES:
            raise _bad(f"--quality-policy must be flag or error, got {self.policy!r}")
        # A phrase is matched as captions are compared: "..." normalizes to nothing,
        # which would match between any two words.
        empty = next((p for p in self.banned_phrases if not normalized(p)), None)
        if empty is not None:
            raise _bad(f"--quality-banned-phrase {empty!r}: an empty phrase (once case, "
                       "spacing and outer punctuation are ignored) would ban every caption")
        if self.language is not None:
            from .language import check_code

            check_code(self.language)

    @property
    def active(self) -> bool:
        """Whether any check is on (else the gate is not built at all)."""
        return any((self.refusal, self.boilerplate, self.min_words, self.max_words,
                    self.min_chars, self.max_chars, self.banned_phrases, self.language,
                    self.json_schema is not None, self.max_repeats))

    def describe(self) -> dict[str, Any]:
        """The checks as recorded in ``_dataset.json`` and the run report."""
        out: dict[str, Any] = {k: getattr(self, k) for k in (
            "refusal", "boilerplate", "min_words", "max_words", "min_chars", "max_chars",
            "language", "max_repeats", "policy", "reask")}
        out["banned_phrases"] = list(self.banned_phrases)
        out["json_schema"] = self.json_schema_path
        return out


def load_schema(path: str | None) -> dict[str, Any] | None:
    """The JSON Schema ``--quality-json-schema`` names, checked as a schema up front."""
    if path is None:
        return None
    from ..wire.options import read_schema_file, schema_problem

    try:
        doc = json.loads(read_schema_file(path, "--quality-json-schema"))
    except (ValueError, RecursionError) as e:
        raise _bad(f"--quality-json-schema {path}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _bad(f"--quality-json-schema {path}: a schema is a JSON object")
    problem = schema_problem(doc)
    if problem:
        raise _bad(f"--quality-json-schema {path}: not a valid JSON Schema ({problem})")
    return doc
