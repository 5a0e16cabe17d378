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
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..keys import PartRows, hex64, hex64_one
from ..records import Original, ResultRow

_RECENT_MAX = 100_000
_BATCH = 65_536
RECENT_MAX = _RECENT_MAX  # --dry-run mirrors this bound when it predicts copies


def dedup_key(sha256: str, prompt: str, system: str | None, model: str) -> str:
    h = hashlib.sha256("\x1f".join((sha256, prompt, system or "", model)).encode())
    return h.hexdigest()[:32]


class Dedupe:
    """Claims and results per dedup key; ``lookup_done`` reads an original from OUT."""

    def __init__(self, lookup_done: Callable[[str], Original | None] | None = None) -> None:
        self._lookup_done = lookup_done
        self._inflight: dict[str, asyncio.Future[Original | None]] = {}
        self._recent: OrderedDict[str, Original] = OrderedDict()
        self.copies = 0

    async def claim(self, key: str) -> Original | None:
        """None: the caller captions this key. Else the original to copy."""
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

    def resolve(self, key: str, row: ResultRow | None) -> None:
        """The claimer's outcome: an ok row to share, or None (failed, cancelled)."""
        fut = self._inflight.pop(key, None)
        original = None
        if row is not None and row.ok:
            original = Original.of(row)
            self._recent[key] = original
            if len(self._recent) > _RECENT_MAX:
                self._recent.popitem(last=False)
        if fut is not None and not fut.done():
            fut.set_result(original)

    def _hit(self, original: Original) -> Original:
        self.copies += 1
        return original


class ImageIndex:
    """Where OUT holds an ok row for each dedup key: 16 bytes a row, rows read lazily.

    A dedup key is hex; its first 16 digits, read as a 64-bit integer in bulk by NumPy,
    index it, so a million finished rows cost no Python string at all.
    """

    def __init__(self, parts: list[Path]) -> None:
        self.index = PartRows(parts, _ORIGINAL)
        for i, part in enumerate(parts):
            pf = pq.ParquetFile(part)
            if "dedup_key" not in pf.schema_arrow.names:
                continue  # written before images were keyed
            offset = 0
            for t in pf.iter_batches(_BATCH, columns=["dedup_key", "status"]):
                ok = pc.and_(pc.equal(t["status"], "ok"), pc.is_valid(t["dedup_key"]))
                rows = np.flatnonzero(ok.fill_null(False).to_numpy(zero_copy_only=False))
                self.index.add(i, hex64(t["dedup_key"].take(pa.array(rows))), rows + offset)
                offset += t.num_rows
        self.index.seal()

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, key: str) -> Original | None:
        """The original ok row for ``key`` (id and caption fields), or None."""
        for row in self.index.rows(hex64_one(key)):
            if row.get("dedup_key") == key:  # guard against a collision of the prefixes
                flags = row.get("quality_flags")
                return Original(row["id"], row.get("caption"), row.get("finish_reason"),
                                row.get("finish_reason_raw"), row.get("model"),
                                row.get("response_id"), row.get("terminal"),
                                tuple(flags) if flags is not None else None)
        return None


_ORIGINAL = ["id", "dedup_key", "caption", "finish_reason", "finish_reason_raw", "model",
             "response_id", "terminal", "quality_flags"]
