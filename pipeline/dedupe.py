"""Caption each distinct image once: same bytes, same prompt, same model → one request.

The key is a hash of the image's sha256, the prompt, the system message and the
model. The first row with a key captions it; a row with the same key waits for that
result (if it is in flight) or copies it (if it finished in this run or is already
in OUT) and records ``dedup_of`` = the id that was captioned. A failed original lets
its duplicates try for themselves.

Memory stays bounded: finished keys of OUT are 16 bytes each (hash + where the row
is), results of this run are kept in a bounded LRU, and only in-flight keys hold a
future.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

_COPIED = ("caption", "finish_reason", "finish_reason_raw", "model", "response_id",
           "terminal")
_RECENT_MAX = 100_000
RECENT_MAX = _RECENT_MAX  # --dry-run mirrors this bound when it predicts copies


def dedup_key(sha256: str, prompt: str, system: str | None, model: str) -> str:
    h = hashlib.sha256("\x1f".join((sha256, prompt, system or "", model)).encode())
    return h.hexdigest()[:32]


class Dedupe:
    """Claims and results per dedup key; ``lookup_done`` reads an original from OUT."""

    def __init__(self, lookup_done: Callable[[str], dict[str, Any] | None] | None = None
                 ) -> None:
        self._lookup_done = lookup_done
        self._inflight: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.copies = 0

    async def claim(self, key: str) -> dict[str, Any] | None:
        """None: the caller captions this key. Else the original's fields to copy."""
        while True:
            fut = self._inflight.get(key)
            if fut is None:
                break
            original = await asyncio.shield(fut)
            if original is not None:
                return self._hit(original)
            # The original failed: this row tries itself (or waits for a newer claim).
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._hit(self._recent[key])
        if self._lookup_done is not None:
            found = await asyncio.to_thread(self._lookup_done, key)
            if found is not None:
                return self._hit(found)
        self._inflight[key] = asyncio.get_running_loop().create_future()
        return None

    def resolve(self, key: str, row: dict[str, Any] | None) -> None:
        """The claimer's outcome: an ok row to share, or None (failed, cancelled)."""
        fut = self._inflight.pop(key, None)
        original = None
        if row is not None and row.get("status") == "ok":
            original = {"id": row["id"], **{k: row.get(k) for k in _COPIED}}
            self._recent[key] = original
            if len(self._recent) > _RECENT_MAX:
                self._recent.popitem(last=False)
        if fut is not None and not fut.done():
            fut.set_result(original)

    def _hit(self, original: dict[str, Any]) -> dict[str, Any]:
        self.copies += 1
        return original
