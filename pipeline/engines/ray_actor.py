"""What runs inside Ray for ``--engine ray``: the planning task and the caption actors.

Ray Data moves *chunks*: one dataset row holds a whole chunk of work (a pickled list of
``ManifestRow``s going in, an Arrow IPC table of result rows in the output schema coming
out), and the engine sets the block size so that every chunk is its own block. That
makes one Ray task = one chunk, whatever Ray Data's block shaping does, so a chunk is
the unit that is dispatched, retried after an actor dies, and at most lost.

* ``plan_chunks`` (one task, pinned to the driver's node) runs the one planner
  (``sources.plan.Plan``) over the manifest with the driver's set of done keys, and
  yields chunks that never split a manifest row's prompts; the last carries the counts.
* ``CaptionActor`` builds, once, the local engine's stack (transport, image source with
  its thread pool, limiter with this actor's share of the concurrency and budgets,
  retries, dedupe, ``Worker``) on its own event loop in a background thread, and runs
  each chunk's rows concurrently through ``Worker.process``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import pickle
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import RunFatal
from ..images.pool import DaemonPool
from ..keys import KeySet
from ..pacing.cost import BudgetReached
from ..pacing.limiter import Budgets
from ..quality import Gate
from ..records import ManifestRow, PreparedImage, ResultRow, output_schema
from ..run.stack import build_worker
from ..run.worker import Interrupted, Worker
from ..settings import Secret, Settings
from ..sources.choose import open_source
from ..sources.manifest_format import ManifestFormat
from ..sources.plan import NamedPrompt, Plan
from ..store.sink import to_table
from ..validate import RowConformer

__all__ = ["CaptionActor", "Share", "CHUNK_SCHEMA", "plan_chunks", "decode_rows"]

# kind: "rows" (payload: pickled ManifestRows in, Arrow IPC result table out),
# "stats" (payload: JSON counts of the plan), "fatal" (info: why the plan stopped).
CHUNK_SCHEMA = pa.schema([("kind", pa.string()), ("payload", pa.binary()),
                          ("info", pa.string())])
_MAX_LOGGED_DUPLICATES = 100


def _chunk(kind: str, payload: bytes | None = None, info: str | None = None) -> pa.Table:
    return pa.Table.from_pydict({"kind": [kind], "payload": [payload], "info": [info]},
                                schema=CHUNK_SCHEMA)


def plan_chunks(batch: Any, *, manifest: str, fmt: ManifestFormat,
                prompts: tuple[NamedPrompt, ...], limit: int | None, done: list[Any],
                chunk_rows: int, max_member: int | None = None) -> Iterator[pa.Table]:
    """A Ray Data generator UDF: the pending rows of the manifest, as chunks.

    The one planner (``sources.plan.Plan``), over the driver's set of done keys (the
    key hash is the same in every process), so line numbers, bad lines, derived ids,
    named prompts, duplicate ids and ``--limit`` are exactly the local engine's. Chunks
    end at manifest-row boundaries; the last one carries the counts.
    """
    done_keys = np.empty(0, np.int64)
    if done:  # the sorted key hashes, from the object store (zero-copy)
        import ray

        done_keys = ray.get(done[0])
    duplicates: list[list[Any]] = []
    source = open_source(manifest if "://" in manifest else Path(manifest), fmt, max_member)
    plan = Plan(source, KeySet.from_sorted(done_keys), prompts, limit)
    plan.log_duplicate = lambda row: (duplicates.append([row.line, row.id])
                                      if len(duplicates) < _MAX_LOGGED_DUPLICATES else None)
    try:
        chunk: list[ManifestRow] = []
        for group in plan:
            chunk += group
            if len(chunk) >= chunk_rows:
                yield _chunk("rows", pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL))
                chunk = []
        if chunk:
            yield _chunk("rows", pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL))
    except Exception as e:  # the driver stops with exit 2, like the local run
        yield _chunk("fatal", info=json.dumps({
            "fatal": f"manifest {manifest}: reading stopped: {e}", "error_class": "manifest",
            "exit_code": 2}))
    c = plan.counts
    yield _chunk("stats", json.dumps({
        "skipped_done": c.skipped_done, "skipped_duplicate": c.skipped_duplicate,
        "pending": c.pending, "duplicates": duplicates}).encode())


def _quiet_unclosed(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An actor Ray retires after a stop is garbage-collected with its HTTP sessions
    open; aiohttp's "Unclosed client session" report of that is noise, not a problem."""
    if not str(context.get("message", "")).startswith(("Unclosed client session",
                                                        "Unclosed connector")):
        loop.default_exception_handler(context)


def encode_rows(rows: list[ResultRow], schema: pa.Schema) -> bytes:
    """Result rows as an Arrow IPC stream in the output schema (conformed here, in the
    actor, so no value from the wire can fail the chunk)."""
    sink = io.BytesIO()
    conform = RowConformer(schema)
    table = to_table([conform(r.to_record()) for r in rows], schema)
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def decode_rows(payload: bytes) -> list[ResultRow]:
    table = pa.ipc.open_stream(payload).read_all()
    return [ResultRow.from_record(r) for r in table.to_pylist()]


@dataclass(frozen=True)
class Share:
    """One actor's part of the run: concurrency, budgets per minute, cost, image threads."""

    concurrency: int
    rpm: float | None = None
    tpm: float | None = None
    itpm: float | None = None
    otpm: float | None = None
    max_cost: float | None = None
    image_threads: int = 1
    extra_columns: tuple[str, ...] = ()


class CaptionActor:
    """A Ray Data callable class: chunks of ``ManifestRow``s in, chunks of result rows out.

    ``__call__`` may run in several Ray threads at once; all of them submit to the one
    event loop, so the chunks in flight share the limiter, the connection pool and the
    dedupe table. A ``RunFatal`` cancels every row in flight in this actor (the rows
    finished so far are returned), and from then on chunks come back empty with the
    reason, which the driver turns into the run's exit code; ``--max-cost`` reached
    stops starting rows the same way.
    """

    def __init__(self, settings: Settings, share: Share, key: Secret | None = None) -> None:
        self.s = settings if key is None else replace(settings, api_key=key)
        self.share = share
        self.schema = output_schema(list(share.extra_columns))
        self.halt: dict[str, Any] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_quiet_unclosed)
        self._thread = threading.Thread(target=self.loop.run_forever, name="caption-loop",
                                        daemon=True)
        self._thread.start()
        self._stack = contextlib.AsyncExitStack()
        self.worker: Worker = self._run(self._build())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def __del__(self) -> None:
        """Ray Data drops the UDF when it retires the actor: close the sessions cleanly."""
        loop = getattr(self, "loop", None)
        if loop is None or not loop.is_running():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stack.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)

    async def _build(self) -> Worker:
        """The local engine's stack, with this actor's share; dedupe only within it
        (OUT is not indexed on the cluster)."""
        s, share = self.s, self.share
        return await build_worker(
            self._stack, s, concurrency=share.concurrency,
            budgets=Budgets(share.rpm, share.tpm, share.itpm, share.otpm),
            max_cost=share.max_cost,
            executor=DaemonPool(share.image_threads, name="image"),
            lookup_done=None, should_stop=lambda: self.halt is not None,
            # The checks and the re-ask run in each actor; repeats count per actor.
            gate=Gate(s.quality) if s.quality.active else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        kinds, payloads, infos = (batch.column(n).to_pylist() for n in CHUNK_SCHEMA.names)
        out: dict[str, list[Any]] = {"kind": [], "payload": [], "info": []}
        for kind, payload, info in zip(kinds, payloads, infos):
            if kind == "rows":
                results, halt = self._run(self._chunk(pickle.loads(payload)))
                payload = encode_rows(results, self.schema)
                info = json.dumps(halt) if halt else None
            out["kind"].append(kind)
            out["payload"].append(payload)
            out["info"].append(info)
        return pa.Table.from_pydict(out, schema=CHUNK_SCHEMA)

    async def _chunk(self, rows: list[ManifestRow]
                     ) -> tuple[list[ResultRow], dict[str, Any] | None]:
        if self.halt is not None:
            return [], self.halt
        prepared: dict[tuple[int, str], asyncio.Future[PreparedImage]] = {}
        tasks = []
        for row in rows:
            image = None
            if not row.error:  # one preparation for all prompts of a manifest row
                image = prepared.get((row.line, row.id))
                if image is None:
                    image = self.worker.prepare(row)
                    prepared[(row.line, row.id)] = image
            tasks.append(asyncio.create_task(self._one(row, image)))
        self.tasks.update(tasks)
        try:
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.tasks.difference_update(tasks)
            for fut in prepared.values():
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # retrieved: a failed image is each row's error row
        for o in outcomes:
            if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError):
                raise o  # a bug, not a row's problem: fail the task loudly
        return [o for o in outcomes if isinstance(o, ResultRow)], self.halt

    async def _one(self, row: ManifestRow, image: asyncio.Future[PreparedImage] | None
                   ) -> ResultRow | None:
        try:
            return await self.worker.process(row, image)
        except Interrupted:
            return None  # stays pending for the next run
        except BudgetReached as e:
            if self.halt is None:  # rows in flight finish; no new row starts here
                self.halt = {"budget": str(e)}
            return None
        except RunFatal as e:
            if self.halt is None or "fatal" not in self.halt:
                self.halt = {"fatal": e.message, "error_class": e.error_class,
                             "exit_code": e.exit_code}
            me = asyncio.current_task()
            for t in self.tasks:
                if t is not me:
                    t.cancel()  # rows in flight are not written: they stay pending
            return None
