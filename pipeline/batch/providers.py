"""The two batch APIs behind one face: OpenAI Files + Batches, Anthropic Message Batches.

Each call goes through the run's transport (``wire.transport.Transport.call``), under
the run's retry policy for transient failures; an answer that is not a 2xx becomes the
same error classes as online (``errors.classify_http``), and 413 is ``TooLarge`` (the
caller splits the file). A JSON answer is read up to ``MAX_JSON_BYTES``; result files
are streamed line by line, each line at most ``line_cap`` bytes.
What this relies on from each API is written down in docs/protocol.md §17.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from ..errors import Retryable, RowFailed, classify_http
from ..pacing.retry import RetryPolicy
from ..wire.channel import read_capped
from ..wire.transport import Transport, Upload
from .ledger import Entry

__all__ = ["AnthropicBatches", "BatchApi", "OpenAIBatches", "Remote", "TooLarge", "get_api"]

MAX_JSON_BYTES = 8 * 1024 * 1024   # one batch object or list page
LIST_PAGES = 20                    # pages of 100 searched for a batch to adopt
ADOPT_SLACK_S = 600.0              # a batch made this long before "creating" is not ours
T = TypeVar("T")


class TooLarge(Exception):
    """The provider refused a request file or body as too large (HTTP 413)."""


@dataclass
class Remote:
    """A batch as the provider sees it, in the words the lane needs."""

    id: str
    status: str                 # the provider's word
    ended: bool                 # results (if any) can be read now
    failed: bool = False        # refused as a whole: nothing ran
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_url: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    note: str | None = None


class BatchApi:
    """What both APIs share: calls with retries, JSON answers, streamed lines."""

    name = ""
    wrap_lines = False  # Anthropic: the file's lines go into one JSON body

    def __init__(self, transport: Transport, policy: RetryPolicy, line_cap: int,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.t = transport
        self.policy = policy
        self.line_cap = line_cap
        self.sleep = sleep

    async def _retrying(self, what: Callable[[], Awaitable[T]]) -> T:
        attempts = 0
        while True:
            attempts += 1
            try:
                return await what()
            except Retryable as e:
                if not self.policy.may_retry(attempts):
                    raise
                await self.sleep(self.policy.next_delay(attempts, e.retry_after))

    async def _json(self, method: str, path: str, retry: bool = True, **kw: Any
                    ) -> dict[str, Any]:
        """One call's JSON object. ``retry=False`` for a create: an answer lost after
        the provider acted must not be sent again blindly (the caller looks first)."""
        async def once() -> dict[str, Any]:
            given = {k: v() if callable(v) else v for k, v in kw.items()}  # a fresh body
            async with self.t.call(method, path, **given) as (head, chunks):
                body = await read_capped(chunks, MAX_JSON_BYTES)
                if head.status == 413:
                    raise TooLarge(f"HTTP 413 for {path}")
                if not 200 <= head.status < 300:
                    raise classify_http(head.status, head.headers, body)
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):
                raise Retryable(f"{method} {path}: an answer that is not JSON",
                                "stream_broken") from None
            if not isinstance(doc, dict):
                raise RowFailed(f"{method} {path}: the answer is not a JSON object",
                                "bad_response")
            return doc
        return await (self._retrying(once) if retry else once())

    # What each API implements (docs/protocol.md §17.1, §17.2).
    def line(self, cid: str, body: dict[str, Any]) -> bytes:
        raise NotImplementedError

    async def find_file(self, entry: Entry) -> str | None:
        raise NotImplementedError

    async def upload(self, entry: Entry, path: Path) -> str:
        raise NotImplementedError

    async def create(self, entry: Entry, path: Path) -> Remote:
        raise NotImplementedError

    async def find_batch(self, entry: Entry, known: set[str]) -> Remote | None:
        raise NotImplementedError

    async def get(self, batch_id: str) -> Remote:
        raise NotImplementedError

    async def cancel(self, batch_id: str) -> Remote:
        raise NotImplementedError

    def results(self, entry: Entry) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def lines(self, path: str, url: str | None = None) -> AsyncIterator[bytes]:
        """A results file, line by line; a line longer than ``line_cap`` is skipped
        whole (its row stays pending) instead of being held in memory."""
        async with self.t.call("GET", path, url=url) as (head, chunks):
            if not 200 <= head.status < 300:
                error = classify_http(head.status, head.headers, await read_capped(
                    chunks, 64 * 1024))
                if head.status == 404:  # results gone (kept 29 days): this batch's, not
                    raise RowFailed(error.message, "not_found")  # the run's, problem
                raise error
            buf, skipping = bytearray(), False
            async for chunk in chunks:
                start = 0
                while (nl := chunk.find(b"\n", start)) >= 0:
                    if not skipping:
                        buf += chunk[start:nl]
                        if len(buf) <= self.line_cap:
                            yield bytes(buf)
                    buf.clear()
                    skipping = False
                    start = nl + 1
                if not skipping:
                    buf += chunk[start:]
                    if len(buf) > self.line_cap:
                        buf.clear()
                        skipping = True
            if buf and not skipping:
                yield bytes(buf)


class OpenAIBatches(BatchApi):
    name = "openai"
    endpoint = "/v1/chat/completions"

    def line(self, cid: str, body: dict[str, Any]) -> bytes:
        doc = {"custom_id": cid, "method": "POST", "url": self.endpoint, "body": body}
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    async def find_file(self, entry: Entry) -> str | None:
        """A file uploaded for this entry before a kill (same name and size)."""
        doc = await self._json("GET", "/files?purpose=batch")
        for f in doc.get("data") or []:
            if isinstance(f, dict) and f.get("filename") == _filename(entry) \
                    and f.get("bytes") == entry.bytes and isinstance(f.get("id"), str):
                return str(f["id"])
        return None

    async def upload(self, entry: Entry, path: Path) -> str:
        doc = await self._json("POST", "/files", upload=Upload(
            path, _filename(entry), {"purpose": "batch"}))
        return _text(doc.get("id"), "file id")

    async def create(self, entry: Entry, path: Path) -> Remote:
        body = {"input_file_id": entry.file_id, "endpoint": self.endpoint,
                "completion_window": "24h",
                "metadata": {"caption_pipeline": entry.lid, "request_sha256": entry.sha256,
                             "run_id": entry.run_id}}
        return self._remote(await self._json("POST", "/batches", retry=False,
                                             body=json.dumps(body).encode()))

    async def find_batch(self, entry: Entry, known: set[str]) -> Remote | None:
        after = None
        for _ in range(LIST_PAGES):
            page = await self._json("GET", "/batches?limit=100" +
                                    (f"&after={after}" if after else ""))
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for b in data:
                meta = _obj(b.get("metadata"))
                if meta.get("caption_pipeline") == entry.lid \
                        and meta.get("request_sha256") == entry.sha256:
                    return self._remote(b)
            if not page.get("has_more") or not data:
                return None
            after = data[-1].get("id")
        return None

    async def get(self, batch_id: str) -> Remote:
        return self._remote(await self._json("GET", f"/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> Remote:
        return self._remote(await self._json("POST", f"/batches/{batch_id}/cancel"))

    async def results(self, entry: Entry) -> AsyncIterator[bytes]:
        for fid in (entry.output_file_id, entry.error_file_id):
            if fid:
                async for line in self.lines(f"/files/{fid}/content"):
                    yield line

    def _remote(self, b: dict[str, Any]) -> Remote:
        status = str(b.get("status") or "")
        counts = _obj(b.get("request_counts"))
        errors = _obj(b.get("errors")).get("data")
        note = "; ".join(str(e.get("message"))[:200] for e in errors[:3]
                         if isinstance(e, dict)) if isinstance(errors, list) else None
        return Remote(_text(b.get("id"), "batch id"), status,
                      ended=status in ("completed", "failed", "expired", "cancelled"),
                      failed=status == "failed", output_file_id=_opt(b.get("output_file_id")),
                      error_file_id=_opt(b.get("error_file_id")),
                      counts={k: v for k, v in counts.items() if isinstance(v, int)},
                      note=note)


class AnthropicBatches(BatchApi):
    name = "anthropic"
    wrap_lines = True

    def line(self, cid: str, body: dict[str, Any]) -> bytes:
        doc = {"custom_id": cid, "params": body}
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    async def find_file(self, entry: Entry) -> str | None:
        return None  # no upload step: the requests go in the create body

    async def upload(self, entry: Entry, path: Path) -> str:
        raise NotImplementedError("Anthropic batches take their requests in the body")

    async def create(self, entry: Entry, path: Path) -> Remote:
        return self._remote(await self._json("POST", "/messages/batches", retry=False,
                                             body=lambda: _wrapped(path)))

    async def find_batch(self, entry: Entry, known: set[str]) -> Remote | None:
        """Message batches carry no metadata: the one created after this entry's
        ``creating`` mark with its request count, that no other entry owns (the
        oldest such); results are checked against the entry's custom_ids anyway."""
        after, found = None, []
        since = (entry.creating_at or 0) - ADOPT_SLACK_S
        for _ in range(LIST_PAGES):
            page = await self._json("GET", "/messages/batches?limit=100" +
                                    (f"&after_id={after}" if after else ""))
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for b in data:
                created = _epoch(b.get("created_at"))
                total = sum(v for v in _obj(b.get("request_counts")).values()
                            if isinstance(v, int))
                if created is not None and created >= since and total == entry.requests \
                        and b.get("id") not in known:
                    found.append((created, b))
            oldest = _epoch(data[-1].get("created_at")) if data else None
            if not page.get("has_more") or not data or (oldest or 0) < since:
                break
            after = data[-1].get("id")
        return self._remote(min(found, key=lambda f: f[0])[1]) if found else None

    async def get(self, batch_id: str) -> Remote:
        return self._remote(await self._json("GET", f"/messages/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> Remote:
        return self._remote(await self._json("POST", f"/messages/batches/{batch_id}/cancel"))

    async def results(self, entry: Entry) -> AsyncIterator[bytes]:
        if entry.results_url:
            async for line in self.lines("", url=entry.results_url):
                yield line

    def _remote(self, b: dict[str, Any]) -> Remote:
        status = str(b.get("processing_status") or "")
        counts = _obj(b.get("request_counts"))
        return Remote(_text(b.get("id"), "batch id"), status, ended=status == "ended",
                      results_url=_opt(b.get("results_url")),
                      counts={k: v for k, v in counts.items() if isinstance(v, int)})


async def _wrapped(path: Path) -> AsyncIterator[bytes]:
    """``{"requests": [line, line, ...]}`` streamed from the request file."""
    yield b'{"requests":['
    first = True
    with open(path, "rb") as f:
        for line in f:
            yield (b"" if first else b",") + line.rstrip(b"\n")
            first = False
    yield b"]}"


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _filename(entry: Entry) -> str:
    return f"{entry.lid}-{entry.sha256[:16]}.jsonl"


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v or len(v) > 200:
        raise RowFailed(f"the batch API answered without a usable {what}", "bad_response")
    return v


def _opt(v: Any) -> str | None:
    return v if isinstance(v, str) and v and len(v) <= 2000 else None


def _epoch(v: Any) -> float | None:
    if not isinstance(v, str):
        return None
    try:
        return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def get_api(name: str, transport: Transport, policy: RetryPolicy, line_cap: int) -> BatchApi:
    cls = {"openai": OpenAIBatches, "anthropic": AnthropicBatches}[name]
    return cls(transport, policy, line_cap)

