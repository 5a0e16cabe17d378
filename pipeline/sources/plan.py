"""Which rows this run captions: manifest rows × named prompts, minus what OUT holds.

Each manifest row becomes one row per named prompt, keyed by (id, prompt_name), with
its prompt text rendered from the row's columns. A duplicate id is skipped (the first
is kept), keys already in OUT are skipped, and ``--limit`` caps the pending rows.
Rows come out grouped per manifest row, so its image is prepared once for all prompts.

A manifest on standard input (or a FIFO) can go quiet for as long as whatever writes
it likes: ``groups`` reads such a one-shot manifest in a thread of its own, one row at
a time, so a row starts as soon as it arrives and the event loop (streams in flight,
timeouts, signals) never waits on the pipe.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RunFatal
from ..keys import ImageRefs, KeySet, hash_strings, key_hash, key_hashes
from ..records import DEFAULT_PROMPT_NAME, ManifestRow
from ..wire.options import render_prompt
from . import location
from .base import Source
from .chain import Later

__all__ = ["NamedPrompt", "Plan", "PlanCounts", "row_values", "variants"]

_BLOCK = 4096
_AHEAD = 64  # groups a one-shot manifest's reader thread may be ahead of the run


def _hashes(block: list[ManifestRow], prompt_name: str) -> np.ndarray:
    return key_hashes((r.id for r in block), prompt_name)


@dataclass
class PlanCounts:
    """What the planner skipped and kept so far (the run shows them as they grow)."""

    skipped_done: int = 0       # keys OUT already holds
    skipped_duplicate: int = 0  # manifest rows whose id came before (the first is kept)
    pending: int = 0            # rows planned for this run


@dataclass(frozen=True)
class NamedPrompt:
    name: str
    template: str


def row_values(row: ManifestRow) -> dict[str, Any]:
    """What a prompt template may refer to: the row's columns, id and image."""
    values: dict[str, Any] = {k.removeprefix("manifest_"): v for k, v in row.extra.items()}
    values.update(row.extra, id=row.id, image=row.image, prompt=row.prompt or "")
    values["caption"] = Later(values.get("caption"))  # {caption.NAME}: sources/chain.py
    return values


class Plan:
    def __init__(self, manifest: Source, done: KeySet, prompts: tuple[NamedPrompt, ...],
                 limit: int | None, counts: PlanCounts | None = None,
                 images: ImageRefs | None = None, out: Path | None = None) -> None:
        self.manifest = manifest
        self.images = images if images is not None and len(images) else None
        self.out = out
        self.done = done
        self.prompts = prompts
        self.limit = limit
        self.counts = counts if counts is not None else PlanCounts()
        self._matched = KeySet()  # ids whose first line agreed with OUT's image
        # Told of each row whose id repeats an earlier one (the run logs a warning).
        self.log_duplicate: Callable[[ManifestRow], object] = lambda row: None
        # A stream gives its rows as they come: a block would wait for 4096 of them. A
        # source whose rows hold images says how many may wait at once (block_rows).
        self.block = 1 if getattr(manifest, "one_shot", False) else \
            min(_BLOCK, getattr(manifest, "block_rows", _BLOCK))

    @property
    def threaded(self) -> bool:
        """Read in a thread of its own: a stream, a remote input, or a source whose
        reads are heavy (Parquet batches, shards, a folder walk); a local CSV or JSON
        lines file is read on the loop, between groups."""
        m = self.manifest
        return self.block == 1 or location.is_remote(getattr(m, "path", "")) or \
            getattr(m, "kind", "csv") not in ("csv", "jsonl")

    async def groups(self) -> AsyncIterator[list[ManifestRow]]:
        """The groups of ``__iter__``, without blocking the event loop on a stream."""
        if not self.threaded:
            for group in self:
                yield group
            return
        handoff = _Handoff(asyncio.get_running_loop())
        # A daemon thread, not the loop's executor: a reader stuck on a quiet pipe must
        # not keep the process alive at exit (asyncio.run waits for executor threads).
        threading.Thread(target=handoff.fill, args=(iter(self),), daemon=True,
                         name="manifest-reader").start()
        try:
            while (handed := await handoff.get()) is not None:
                yield handed
        finally:
            handoff.stopped = True

    @property
    def pending(self) -> int:
        return self.counts.pending

    def __iter__(self) -> Iterator[list[ManifestRow]]:
        """Groups of pending rows; an empty group after each block of done rows, so a
        caller that awaits between groups is never blocked for a whole scan."""
        seen = KeySet()  # ids of rows with something pending: done rows need no memory
        rows = self.manifest.rows(self.wanted) if hasattr(self.manifest, "rows") \
            else iter(self.manifest)
        counts = self.counts
        while block := list(islice(rows, self.block)):
            if self.images is not None:
                self._check_images(block)
            # One vectorised lookup per prompt for the whole block, not one per row: a
            # resume over a million finished rows spends its time here.
            done = [self.done.contains_many(_hashes(block, p.name)) for p in self.prompts]
            counts.skipped_done += sum(int(d.sum()) for d in done)
            open_rows = np.flatnonzero(~np.logical_and.reduce(done))  # not all done
            ids = key_hashes((block[k].id for k in open_rows), "")
            for k, h in zip(open_rows, ids.tolist()):  # Python ints
                row = block[k]
                names = {p.name for j, p in enumerate(self.prompts) if not done[j][k]}
                if not seen.add_if_new(h):
                    counts.skipped_duplicate += 1
                    self.log_duplicate(row)
                    continue
                group = []
                for variant in self._variants(row, names):
                    if self.limit is not None and counts.pending >= self.limit:
                        break
                    counts.pending += 1
                    group.append(variant)
                yield group
                if self.limit is not None and counts.pending >= self.limit:
                    return
            yield []

    def wanted(self, rid: str) -> bool:
        """Whether ``rid`` still has a key to caption: a source reads a finished
        record's id only, not its image (a shard's members, a Parquet group's bytes)."""
        return any(key_hash(rid, p.name) not in self.done for p in self.prompts)

    def _check_images(self, block: list[ManifestRow]) -> None:
        """A known id with another image: this is not the manifest OUT was made from.

        Only an id's first line counts: a later line with the same id is a duplicate,
        skipped whatever its image (``_matched`` remembers the ids whose first line
        agreed with OUT: 8 bytes each, at most one per id OUT holds).
        """
        assert self.images is not None
        usable = [r for r in block if not r.error]
        ids = hash_strings((r.id for r in usable), len(usable))
        images = hash_strings((r.image for r in usable), len(usable))
        known, clash = self.images.classify(ids, images)
        self._matched.add_batch(ids[known & ~clash])
        for k in np.flatnonzero(clash):
            if int(ids[k]) in self._matched:
                continue  # a duplicate line of an id whose first line agreed
            row = usable[int(k)]
            raise RunFatal(
                f"manifest {self.manifest.path} line {row.line}: id {row.id!r} is in "
                f"{self.out or 'OUT'} for another image than {row.image!r}. Caption into "
                "a new --out, give the rows new ids, or pass --allow-mixed", "config",
                exit_code=2)

    def _variants(self, row: ManifestRow, names: set[str]) -> Iterator[ManifestRow]:
        return variants(row, [p for p in self.prompts if p.name in names])


class _Handoff:
    """Groups from a reader thread to the event loop, at most ``_AHEAD`` in between."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[list[ManifestRow] | None | BaseException] = asyncio.Queue()
        self.room = threading.Semaphore(_AHEAD)
        self.stopped = False

    def fill(self, groups: Iterator[list[ManifestRow]]) -> None:
        try:
            for group in groups:
                while not self.room.acquire(timeout=0.5):
                    if self.stopped:
                        return
                if self.stopped or not self._put(group):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the loop, raised there
            self._put(e)
            return
        self._put(None)

    def _put(self, item: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the run is over
            return False
        return True

    async def get(self) -> list[ManifestRow] | None:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        self.room.release()
        return item


def variants(row: ManifestRow, prompts: Iterable[NamedPrompt]) -> Iterator[ManifestRow]:
    """One row per named prompt, with its prompt text rendered from the row's columns."""
    values = None if row.error else row_values(row)
    for p in prompts:
        if values is None:
            prompt = None
        elif row.prompt and p.name == DEFAULT_PROMPT_NAME:
            prompt = row.prompt  # the manifest's own prompt column wins for the default
        else:
            prompt = render_prompt(p.template, values)
        yield replace(row, prompt_name=p.name, prompt=prompt)
