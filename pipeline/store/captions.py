"""Where OUT holds the ok caption of a key: 16 bytes a row, the caption read on demand.

For chained prompts (docs/protocol.md §20): a resumed run whose upstream rows finished
in an earlier run reads their captions from the parts, one lookup per dependent row,
instead of holding every caption in memory. Only the prompt names other prompts use
are indexed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..keys import column_key_hashes, key_hash

__all__ = ["CaptionIndex"]

_BATCH = 65_536


class CaptionIndex:
    def __init__(self, parts: list[Path], prompt_names: Iterable[str]) -> None:
        self.parts = parts
        wanted = pa.array(sorted(set(prompt_names)), pa.string())
        keys: list[np.ndarray] = []
        refs: list[np.ndarray] = []
        for i, part in enumerate(parts):
            pf = pq.ParquetFile(part)
            if not {"id", "prompt_name", "status", "caption"} <= set(pf.schema_arrow.names):
                continue
            offset = 0
            for t in pf.iter_batches(_BATCH, columns=["id", "prompt_name", "status"]):
                ok = pc.and_(pc.equal(t["status"], "ok"), pc.is_in(t["prompt_name"], wanted))
                rows = np.flatnonzero(ok.fill_null(False).to_numpy(zero_copy_only=False))
                if len(rows):
                    take = pa.array(rows)
                    keys.append(column_key_hashes(t["id"].take(take),
                                                  t["prompt_name"].take(take)))
                    refs.append((np.int64(i) << 32) | (rows + offset).astype(np.int64))
                offset += t.num_rows
        all_keys = np.concatenate(keys) if keys else np.empty(0, np.int64)
        order = np.argsort(all_keys, kind="stable")
        self._keys = all_keys[order]
        self._refs = (np.concatenate(refs) if refs else np.empty(0, np.int64))[order]
        self._cache: tuple[int, pa.Table] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, rid: str, prompt_name: str) -> str | None:
        """The ok caption OUT holds for (``rid``, ``prompt_name``), or None. A key
        written twice (only ever by --allow-mixed merges) gives its last row."""
        h = key_hash(rid, prompt_name)
        lo, hi = np.searchsorted(self._keys, h, "left"), np.searchsorted(self._keys, h, "right")
        for i in range(int(hi) - 1, int(lo) - 1, -1):
            ref = int(self._refs[i])
            row = self._row(ref >> 32, ref & 0xFFFFFFFF)
            if row.get("id") == rid and row.get("prompt_name") == prompt_name:
                caption = row.get("caption")
                return caption if isinstance(caption, str) else None
        return None

    def _row(self, part: int, row: int) -> dict[str, Any]:
        with self._lock:  # lookups run in worker threads; one cached part at a time
            if self._cache is None or self._cache[0] != part:
                self._cache = (part, pq.read_table(self.parts[part],
                                                   columns=["id", "prompt_name", "caption"]))
            found: dict[str, Any] = self._cache[1].slice(row, 1).to_pylist()[0]
            return found
