"""What the local gateway SIMULATOR's "model" does beyond captioning, in every dialect.

Owns the traits a request gives its answer, decided once from the request whatever its
protocol: a function offered (the answer is a call of it, its arguments the caption as
``{"caption": ...}``), a thinking model (a model whose name contains ``think`` reasons
before it answers: ``THOUGHTS`` tokens for the reasoning effort asked, spent from
``max_tokens`` first, so a small budget ends in ``length`` with little or no caption),
and the prompt triggers (``[refuse]``: the model declines; ``[gap]``: a Responses
stream skips a sequence number).

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .captions import split_tokens

if TYPE_CHECKING:
    from .wire import Job

__all__ = ["GAP_TRIGGER", "REFUSAL_TEXT", "REFUSE_TRIGGER", "THOUGHTS", "TOOL_NAME",
           "thought_pieces", "with_traits"]

TOOL_NAME = "caption"
REFUSE_TRIGGER = "[refuse]"
GAP_TRIGGER = "[gap]"
REFUSAL_TEXT = "I'm sorry, but I can't help with describing this image."
# Reasoning tokens a thinking model spends, by the effort asked (medium when none is).
THOUGHTS = {"none": 0, "minimal": 16, "low": 48, "medium": 96, "high": 192}
_THOUGHT = "Looking at the image first: its colours, its light, then its subject. "


def effort_for_budget(budget: int) -> str:
    """The effort a thinking budget stands for: a larger budget, more reasoning."""
    for effort, ceiling in (("none", 0), ("minimal", 512), ("low", 2048), ("medium", 8192)):
        if budget <= ceiling:
            return effort
    return "high"


def thinks(model: str) -> bool:
    return "think" in model.lower()


def with_traits(job: Job, effort: str | None, tool: bool,
                budget: int | None = None) -> Job:
    """``job`` with the traits its request asks for. ``budget`` caps the reasoning where
    the protocol sets one (Anthropic ``budget_tokens``, Gemini ``thinkingBudget``)."""
    if effort is None and budget is not None:
        effort = effort_for_budget(budget)
    thoughts = THOUGHTS.get(effort or "medium", THOUGHTS["medium"]) if thinks(job.model) else 0
    if budget is not None:
        thoughts = min(thoughts, max(0, budget))
    text = job.prompt.text
    return replace(job, tool=tool, thoughts=thoughts, refuse=REFUSE_TRIGGER in text,
                   gap=GAP_TRIGGER in text)


def thought_pieces(count: int) -> tuple[str, ...]:
    """``count`` reasoning pieces (~4 characters each, as captions are cut)."""
    pieces: list[str] = []
    while len(pieces) < count:
        pieces += split_tokens(_THOUGHT)
    return tuple(pieces[:count])
