"""The quality gate: a caption's verdict (every failed check) and the one re-ask's text.

``Gate.judge`` checks a caption's text; ``Gate.keep`` counts the caption a row finally
keeps (for the repeat check). The gate decides nothing about requests: the worker's
re-ask (``run/reask.py``) sends the follow-up turn and applies the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import Flag, TextChecks
from .config import QualitySettings
from .repeats import RepeatCounter

__all__ = ["Gate", "Verdict"]


@dataclass(frozen=True)
class Verdict:
    flags: tuple[Flag, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.flags

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.flags)

    @property
    def notes(self) -> str:
        return "; ".join(f"{f.name}: {f.note}" for f in self.flags)

    @property
    def instruction(self) -> str:
        """The follow-up turn: every failed check, measured, and what to do instead."""
        if len(self.flags) == 1:
            return self.flags[0].instruction
        lines = "\n".join(f"- {f.instruction}" for f in self.flags)
        return (f"Your previous answer did not meet these requirements:\n{lines}\n"
                "Answer again with a caption that meets all of them.")


class Gate:
    def __init__(self, q: QualitySettings, repeats: RepeatCounter | None = None) -> None:
        self.q = q
        self.checks = TextChecks(q)
        self.repeats = repeats if repeats is not None else (
            RepeatCounter() if q.max_repeats else None)

    def judge(self, prompt_name: str, text: str, caption_json: str | None = None) -> Verdict:
        flags = self.checks.run(text, caption_json)
        if self.repeats is not None and self.q.max_repeats is not None:
            seen = self.repeats.seen(prompt_name, text)
            if seen >= self.q.max_repeats:
                flags.append(Flag(
                    "repeated", f"the same text as {seen} other images",
                    f"Your answer is the same text already given for {seen} other "
                    "images. Describe what is specific to this image."))
        return Verdict(tuple(flags))

    def keep(self, prompt_name: str, text: str | None) -> None:
        """The caption a row keeps: it counts towards later repeats."""
        if self.repeats is not None and text:
            self.repeats.add(prompt_name, text)
