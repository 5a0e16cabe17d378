"""Where OUT holds the ok caption of a key: 16 bytes a row, the caption read on demand.

For chained prompts (docs/protocol.md §20): a resumed run whose upstream rows finished
in an earlier run reads their captions from the parts, one lookup per dependent row,
instead of holding every caption in memory. Only the prompt names other prompts use
are indexed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..keys import PartRows, column_key_hashes, key_hash

__all__ = ["CaptionIndex"]

_BATCH = 65_536


class CaptionIndex:
    def __init__(self, parts: list[Path], prompt_names: Iterable[str]) -> None:
        wanted = pa.array(sorted(set(prompt_names)), pa.string())
        self.index = PartRows(parts, ["id", "prompt_name", "caption"])
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
                    self.index.add(i, column_key_hashes(t["id"].take(take),
                                                        t["prompt_name"].take(take)),
                                   rows + offset)
                offset += t.num_rows
        self.index.seal()

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, rid: str, prompt_name: str) -> str | None:
        """The ok caption OUT holds for (``rid``, ``prompt_name``), or None. A key
        written twice (only ever by --allow-mixed merges) gives its last row."""
        found = None
        for row in self.index.rows(key_hash(rid, prompt_name)):
            if row.get("id") == rid and row.get("prompt_name") == prompt_name:
                caption = row.get("caption")
                found = caption if isinstance(caption, str) else found
        return found
