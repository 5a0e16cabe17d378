"""Pending rows → request files under the caps (the split planner), the online way.

Each row's image is prepared by the image stage (URLs passed by reference unless
``--fetch-urls``, local files as base64), its request body built by the protocol
adapter (the online body, without the streaming fields), and its line added to the
current request file; when the next line would pass a cap, the file is sealed (the
ledger records it: ``built``) and handed on before a new one starts. Images are
prepared a window ahead, in order. What the online lane would write without asking the
provider (a bad row, a bad image, a copy of an identical image OUT holds) is kept at
once as a batch-lane row; identical images within one file are asked once (``copy_of``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import RowFailed
from ..images.dedupe import ImageIndex, dedup_key
from ..keys import KeySet, key_hash
from ..pacing.cost import BudgetReached, CostBudget
from ..records import ManifestRow, PreparedImage, ResultRow, copied_row, error_row, prompt_sha256
from ..settings import Settings
from ..wire.adapters.base import Adapter
from .files import Caps, RequestFile, row_record
from .ledger import Entry, Ledger, new_lid
from .providers import BatchApi

__all__ = ["Builder", "batch_body"]

log = logging.getLogger("pipeline")
_STREAM_FIELDS = ("stream", "stream_options")
# A row's request: (body, row record, estimated tokens, estimated cost, dedup key).
_Line = tuple[dict[str, Any], dict[str, Any], int, float, str | None]


def batch_body(body: bytes) -> dict[str, Any]:
    """The online request body as a batch request: no streaming (the fold is a JSON
    completion, read by the adapter's ``from_json``)."""
    doc: dict[str, Any] = json.loads(body)
    for name in _STREAM_FIELDS:
        doc.pop(name, None)
    return doc


@dataclass
class Built:
    requests: int = 0
    files: int = 0
    kept: int = 0          # rows written at once (bad rows, copies from OUT)
    budget_note: str | None = None


class Builder:
    def __init__(self, s: Settings, ledger: Ledger, api: BatchApi, adapter: Adapter,
                 prepare: Callable[[ManifestRow], asyncio.Future[PreparedImage]],
                 run_id: str, keep: Callable[[ResultRow], None],
                 index: ImageIndex | None, budget: CostBudget | None) -> None:
        self.s, self.ledger, self.api, self.adapter = s, ledger, api, adapter
        self.prepare, self.run_id, self.keep = prepare, run_id, keep
        self.index, self.budget = index, budget
        requests, size = s.batch_caps
        self.caps = Caps(requests, size, s.batch_max_tokens)
        self.window = max(1, min(s.concurrency, 64))

    async def build(self, groups: AsyncIterator[list[ManifestRow]],
                    sealed: Callable[[Entry], Awaitable[None]],
                    halting: Callable[[], bool], only: KeySet | None = None,
                    skip: KeySet | None = None) -> Built:
        """Write every pending row into request files; ``sealed`` submits each file.
        ``only``: the keys to take (a later round resubmits just those); ``skip``: keys
        a batch in flight will answer."""
        done = Built()
        current: RequestFile | None = None
        copies: dict[str, int] = {}   # dedup key → row index, within the current file
        ahead: deque[tuple[list[ManifestRow], asyncio.Future[PreparedImage] | None]] = deque()
        source = aiter(groups)
        exhausted = False
        try:
            while True:
                while not exhausted and len(ahead) < self.window:
                    try:
                        group = await anext(source)
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    if only is not None or skip is not None:
                        group = [r for r in group if _wanted(r, only, skip)]
                    if group:
                        first = group[0]
                        ahead.append((group, None if first.error else
                                      self.prepare(first)))
                if not ahead or halting() or done.budget_note:
                    break
                group, prepared = ahead.popleft()
                for row in group:
                    line = await self._row(row, prepared, done)
                    if line is None:
                        continue
                    payload, record, tokens, cost, key = line
                    if key is not None and current is not None and key in copies:
                        record["copy_of"] = copies[key]  # asked once in this file
                        current.add_copy(record)
                        continue
                    encoded = self.api.line("x" * 64, payload)  # the size it will have
                    if current is not None and not current.fits(encoded, tokens):
                        await self._seal(current, sealed, done)
                        current, copies = None, {}
                    if current is None:
                        current = self._open()
                    index = current.add(self.api.line(current.next_id(), payload), record,
                                        tokens, cost)
                    if key is not None:
                        copies[key] = index
        finally:
            for _, fut in ahead:
                if fut is not None:
                    fut.cancel()
        if current is not None:
            if current.requests:
                await self._seal(current, sealed, done)
            else:
                current.abandon()
        return done

    def _open(self) -> RequestFile:
        lid = new_lid()
        self.ledger.dir.mkdir(parents=True, exist_ok=True)
        return RequestFile(lid, self.ledger.requests_path(lid), self.ledger.rows_path(lid),
                           self.caps)

    async def _seal(self, f: RequestFile, sealed: Callable[[Entry], Awaitable[None]],
                    done: Built) -> None:
        sha = await asyncio.to_thread(f.seal)
        entry = Entry(f.lid, self.s.api, self.s.model, self.run_id, sha256=sha,
                      requests=f.requests, rows=f.rows, bytes=f.bytes,
                      est_cost_usd=round(f.cost, 6), endpoint=public_endpoint(self.s.endpoint))
        self.ledger.save(entry)  # built: from here on a rerun knows this file
        done.files += 1
        done.requests += f.requests
        await sealed(entry)

    async def _row(self, row: ManifestRow, prepared: asyncio.Future[PreparedImage] | None,
                   done: Built) -> _Line | None:
        """(body, row record, est. tokens, est. cost, dedup key), or None when the row
        was kept at once."""
        if row.error or prepared is None:
            return self._kept_none(error_row(row, row.error or "unusable row", "bad_input"), done)
        try:
            image = await asyncio.shield(prepared)
        except RowFailed as e:
            return self._kept_none(error_row(row, e.message, e.error_class), done)
        except Exception as e:  # an unforeseen input: one row, never the batch
            log.exception("row %s: image stage failed unexpectedly", row.id)
            return self._kept_none(error_row(row, f"internal error preparing the image: "
                                             f"{type(e).__name__}: {e}", "internal"), done)
        s = self.s
        prompt = row.prompt or ""
        columns: dict[str, Any] = {**image.columns(),
                                   "prompt_sha256": prompt_sha256(s.system, prompt)}
        key = None
        if image.sha256 is not None and s.dedupe:
            key = dedup_key(image.sha256, prompt, s.system, s.model)
            columns["dedup_key"] = key
            original = self.index.lookup(key) if self.index is not None else None
            if original is not None:
                return self._kept_none(copied_row(row, original, **columns), done)
        req = self.adapter.build_request(row, image, s.request_spec)
        body = batch_body(req.body)
        size = len(json.dumps(body, ensure_ascii=False).encode()) + 200
        if size + 1024 > self.caps.bytes:
            return self._kept_none(error_row(
                row, f"the request is {size} bytes, more than a batch file may hold "
                     f"({self.caps.bytes}, --batch-max-bytes)", "too_large", **columns), done)
        cost = 0.0
        if self.budget is not None:
            try:
                cost = self.budget.reserve(req.est_input_tokens, req.est_output_tokens)
            except BudgetReached as e:
                done.budget_note = str(e)
                return None
        record = row_record(row, columns, key_hash(row.id, row.prompt_name))
        return body, record, req.est_input_tokens + req.est_output_tokens, cost, key

    def _kept_none(self, row: ResultRow, done: Built) -> _Line | None:
        """Keep a row that needs no request (as a batch-lane row); the caller's None."""
        self.keep(replace(row, lane="batch"))
        done.kept += 1
        return None


def public_endpoint(url: str) -> str:
    """The endpoint as the ledger may keep it: never a user or password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _wanted(row: ManifestRow, only: KeySet | None, skip: KeySet | None) -> bool:
    h = key_hash(row.id, row.prompt_name)
    return (only is None or h in only) and (skip is None or h not in skip)
