"""Chained prompts at run time: fill a row's caption references, record what it used.

A row whose prompt uses ``{caption.tags}`` runs after its image's ``tags`` row (the
planner orders them; the engine runs one image's chained rows in turn). Its prompt's
markers are replaced by the upstream captions, taken from this unit's rows or, for an
upstream finished in an earlier run, from OUT (``store.captions.CaptionIndex``). The
row records which captions it used: ``upstream`` = JSON {prompt name: the first 16
hex digits of the SHA-256 of that caption} (docs/protocol.md §20).

An upstream without an ok caption (an error row now or earlier) makes the dependent
an error row of class ``upstream``: transient, so the next run tries it again, after
its upstream, at no cost while the upstream still fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace

from ..records import ManifestRow, ResultRow, error_row
from ..sources.chain import marker, refs
from ..sources.plan import NamedPrompt
from ..store.captions import CaptionIndex

__all__ = ["UPSTREAM_CHARS", "Chain", "caption_hash"]


# Of an upstream caption, a dependent's prompt takes at most this much: a runaway
# upstream answer is not pasted whole into every request after it.
UPSTREAM_CHARS = 16_384


def caption_hash(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class Chain:
    def __init__(self, prompts: tuple[NamedPrompt, ...], index: CaptionIndex | None) -> None:
        self.uses = {p.name: names for p in prompts if (names := refs(p.template))}
        self.index = index

    @property
    def upstream_names(self) -> set[str]:
        return {n for names in self.uses.values() for n in names}

    async def fill(self, row: ManifestRow, earlier: Mapping[str, ResultRow]
                   ) -> tuple[ManifestRow | None, ResultRow | None, str | None]:
        """(the row with its captions in, None, the ``upstream`` column), or (None, the
        error row, None) when an upstream has no ok caption."""
        names = self.uses.get(row.prompt_name)
        if not names or row.prompt is None:
            return row, None, None
        prompt, used = row.prompt, {}
        for name in names:
            caption, why = await self._upstream(row, name, earlier)
            if caption is None:
                return None, error_row(row, f"prompt {row.prompt_name!r} uses "
                                            f"{{caption.{name}}}, which {why}",
                                       "upstream"), None
            used[name] = caption_hash(caption)  # of the caption as OUT holds it
            if len(caption) > UPSTREAM_CHARS:
                caption = caption[:UPSTREAM_CHARS] + " [...]"
            prompt = prompt.replace(marker(name), caption)
        return replace(row, prompt=prompt), None, json.dumps(used, sort_keys=True)

    async def _upstream(self, row: ManifestRow, name: str,
                        earlier: Mapping[str, ResultRow]) -> tuple[str | None, str]:
        if name in earlier:
            up = earlier[name]
            if up.ok and up.caption:
                return up.caption, ""
            return None, f"failed for this image ({up.error_class}: {(up.error or '')[:80]})"
        if self.index is not None:
            found = await asyncio.to_thread(self.index.lookup, row.id, name)
            if found:
                return found, ""
        return None, "has no ok caption for this image (see its error row)"
