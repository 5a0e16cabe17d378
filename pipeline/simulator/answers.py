"""What the local gateway SIMULATOR's model answers a parsed request, before framing.

One ``Choice`` per requested choice: the caption (as ``{"caption": ...}`` JSON when a
response format or a function asks for JSON, the refusal text on ``[refuse]``), cut
into ~4-character pieces, after the reasoning pieces of a thinking model. Reasoning is
spent from ``max_tokens`` first, so a small budget ends in ``length`` with little or
no caption (docs/protocol.md §14.3).

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
"""

from __future__ import annotations

import json

from .behaviour import REFUSAL_TEXT, thought_pieces
from .captions import caption_for, split_tokens
from .scripted import scripted_text
from .wire import Choice, Job

__all__ = ["choices_for"]


def choices_for(job: Job, seed: int) -> tuple[Choice, ...]:
    out = []
    for index in range(job.n):
        text = REFUSAL_TEXT if job.refuse else caption_for(job.prompt, seed, index)
        if not job.refuse:  # a scripted answer for the quality gate (simulator/scripted.py)
            text = scripted_text(job.prompt, text) or text
        if (job.json_mode or job.tool) and not job.refuse:
            text = json.dumps({"caption": text})
        pieces, thoughts = split_tokens(text), thought_pieces(min(job.thoughts, job.max_tokens))
        room = job.max_tokens - len(thoughts)
        finish = "length" if len(pieces) > room or job.thoughts > len(thoughts) else "stop"
        out.append(Choice(index, tuple(pieces[:room]), finish, thoughts))
    return tuple(out)
