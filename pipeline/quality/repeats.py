"""The same caption for many different images: counted across the run and OUT.

A third-party API that answers every image with one canned text, or a model stuck on
a template, shows as one caption text seen over and over. Texts are counted by a
64-bit hash of their normalized form (``normal.normalized``), per prompt name; copies
of an identical image (``dedup_of``) are the same image and are not counted.

Memory is capped: up to ``REPEATS_CAP`` distinct texts are held exactly (~92 bytes
each); past that, the texts seen only once are forgotten, so a text that repeats
later starts again from one (the counts are then lower bounds, never false alarms).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from .checks import SCAN_CHARS
from .config import REPEATS_CAP
from .normal import normalized

__all__ = ["RepeatCounter"]

_BATCH = 65_536


def _key(prompt_name: str, text: str) -> int:
    # A text is its first 16 KiB here too: two answers alike that far are a repeat.
    raw = (prompt_name + "\x1f" + normalized(text[:SCAN_CHARS])).encode("utf-8",
                                                                         "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


class RepeatCounter:
    def __init__(self, cap: int = REPEATS_CAP) -> None:
        self.cap = cap
        self._counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def seen(self, prompt_name: str, text: str) -> int:
        """How many other images already have this caption text."""
        return self._counts.get(_key(prompt_name, text), 0)

    def add(self, prompt_name: str, text: str) -> None:
        key = _key(prompt_name, text)
        self._counts[key] = self._counts.get(key, 0) + 1
        if len(self._counts) > self.cap:
            self._counts = {k: n for k, n in self._counts.items() if n > 1}

    def add_parts(self, parts: Iterable[Path]) -> None:
        """Count the ok captions OUT holds (a resumed run goes on counting)."""
        for part in parts:
            pf = pq.ParquetFile(part)
            names = pf.schema_arrow.names
            columns = [c for c in ("caption", "status", "prompt_name", "dedup_of")
                       if c in names]
            if "caption" not in columns or "status" not in columns:
                continue
            for batch in pf.iter_batches(_BATCH, columns=columns):
                keep = pc.and_(pc.equal(batch["status"], "ok"), pc.is_valid(batch["caption"]))
                if "dedup_of" in columns:
                    keep = pc.and_(keep, pc.is_null(batch["dedup_of"]))
                rows = batch.filter(keep.fill_null(False))
                names_col = rows["prompt_name"].to_pylist() if "prompt_name" in columns \
                    else ["default"] * rows.num_rows
                for name, text in zip(names_col, rows["caption"].to_pylist()):
                    self.add(name or "default", text)
