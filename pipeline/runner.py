"""The run: manifest → bounded queue → a fixed pool of workers → sink, with shutdown.

* Memory stays flat: the manifest is streamed, the queue holds at most 2 × concurrency
  rows, the sink's buffer is capped, and finished rows leave memory at every flush.
* Exactly one row per key: keys already in OUT are skipped (the checkpoint), a
  duplicate id in the manifest is skipped and counted, and only the sink writes.
* A finished row is journaled at once (the sink), so a kill costs only the rows in
  flight; a group commit (fsync) follows within ``journal.SYNC_SECONDS``.
* Stopping: SIGINT/SIGTERM/SIGHUP stop taking rows, give in-flight requests ``grace``
  seconds, flush what finished, and exit 130/143/129; a second signal cancels at once
  (still flushing). A ``RunFatal`` from a worker cancels the in-flight rows without
  writing them, so they stay pending for the rerun. A write to OUT that fails (full
  disk, no descriptors, read-only) stops the run the same way as a signal, exit 6:
  no new request starts, the rows in flight get the grace, what can still be
  written is written, and the rest stays pending.
* Two runs on one OUT: an ``flock`` on ``OUT/.lock`` (released by the OS when the
  process dies, so a killed run never leaves a stale lock) makes the second exit 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .cost import BudgetReached
from .dataset import Opened, close_dataset, open_dataset
from .dedupe import ImageIndex
from .errors import RunFatal, output_error
from .images import default_executor
from .journal import SYNC_SECONDS, Journal
from .keys import ImageRefs, KeySet
from .manifest import Manifest
from .options import template_fields
from .plan import Plan
from .preflight import Reserve, check_output, fit_descriptors, warn_if_low_space
from .progress import Counters, Progress
from .ratelimit import Budgets
from .records import ManifestRow, PreparedImage, now_utc
from .settings import Settings
from .sink import Batch, ParquetSink, write_run_report
from .stack import build_worker
from .worker import Interrupted, Worker

log = logging.getLogger("pipeline")

EXIT_OK, EXIT_ROWS_FAILED, EXIT_FATAL, EXIT_LOCKED, EXIT_BUDGET = 0, 1, 3, 4, 5
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
_SIGNAL_EXIT = SIGNAL_EXIT  # the name the Ray engine imports
_DONE = None  # queue sentinel
_BUFFER_FLUSHES = 4  # rows buffered at most, in flushes' worth, while a part is written


@dataclass
class RunResult:
    exit_code: int
    counters: Counters
    summary: str
    fatal: str | None = None


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on OUT for the whole run."""
    check_output(out)
    try:
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunFatal(f"--out {out}: cannot create its lock file ({e.strerror})", "output",
                       exit_code=2) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunFatal(f"output {out} is locked by another run (pid {other}); "
                           "wait for it to finish", "locked", exit_code=EXIT_LOCKED) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class Run:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.counters = Counters()
        self.stopping: signal.Signals | None = None
        self.fatal: RunFatal | None = None
        self.output_error: RunFatal | None = None  # a write to OUT failed: exit 6
        self.budget_stop: str | None = None  # --max-cost reached: no new rows, exit 5
        self.queue: asyncio.Queue[tuple[ManifestRow, asyncio.Future[PreparedImage] | None] | None]
        self.queue = asyncio.Queue(2 * settings.concurrency)
        self.workers: list[asyncio.Task[None]] = []
        self._stop_now = asyncio.Event()
        self._flush_now = asyncio.Event()
        self._unwritten: list[Batch] = []  # batches whose part could not be committed
        self.uncommitted = 0  # finished rows no part holds at the end (a failed disk)
        self._closing = False  # the pool has stopped: the flusher ends after its write
        self.started_at = now_utc().isoformat()

    @property
    def halting(self) -> bool:
        return (self.stopping is not None or self.fatal is not None
                or self.budget_stop is not None or self.output_error is not None)

    async def execute(self) -> RunResult:
        manifest = Manifest(self.s.manifest, self.s.manifest_format)
        for p in self.s.named_prompts:
            check_template(p.template, manifest)
        self.s = replace(self.s, concurrency=fit_descriptors(self.s.concurrency))
        opened = await asyncio.to_thread(open_dataset, self.s, manifest, self.run_id)
        resume = opened.resume
        self.counters.errors_retried = resume.rows_retried
        self.counters.errors_kept = resume.rows_error - resume.rows_retried
        self.progress = Progress(self.counters, self.s.progress and sys.stderr.isatty(),
                                 self.s.status_interval,
                                 json_lines=self.s.log_format == "json")
        lines = None if manifest.one_shot else await asyncio.to_thread(count_lines,
                                                                        self.s.manifest)
        estimate = None
        if lines is not None:  # standard input cannot be read twice: the total stays open
            rows = (lines - 1) * len(self.s.named_prompts)  # one row per image and prompt
            estimate = max(0, rows - len(resume.done))
            if self.s.limit is not None:
                estimate = min(estimate, self.s.limit)
            self.progress.set_total(estimate)
        warn_if_low_space(self.s.out, estimate or 0)
        self.reserve = Reserve(self.s.out)
        # CAPTION_JOURNAL=0: parts only (how make bench-crash measures what it saves).
        sink = ParquetSink(self.s.out, opened.schema, self.run_id, self.s.flush_rows,
                           self.s.flush_seconds,
                           journal=os.environ.get("CAPTION_JOURNAL", "1") != "0")
        try:
            async with contextlib.AsyncExitStack() as stack:
                worker = await self._worker(stack, resume.parts, resume.images)
                await self._run_pool(manifest, resume.done, resume.images, worker, sink)
        finally:
            self.reserve.release()
            self.progress.close()
        if not self.halting:
            await asyncio.to_thread(close_dataset, self.s, sink.parts, self.run_id,
                                    opened.schema, resume.rows_retried > 0)
        return self._result(opened)

    async def _worker(self, stack: contextlib.AsyncExitStack, parts: list[Path],
                      images: ImageRefs) -> Worker:
        s = self.s
        lookup = None
        if s.dedupe:  # identical images already captioned in OUT are copied, not resent
            index = await asyncio.to_thread(ImageIndex, parts)
            lookup = index.lookup if len(index) else None
        self.worker = await build_worker(
            stack, s, concurrency=s.concurrency, budgets=Budgets(s.rpm, s.tpm, s.itpm, s.otpm),
            max_cost=s.max_cost, executor=default_executor(), lookup_done=lookup,
            should_stop=lambda: self.halting,
            image_refs=None if s.allow_mixed or not len(images) else images)
        return self.worker

    async def _run_pool(self, manifest: Manifest, done: KeySet, images: ImageRefs,
                        worker: Worker, sink: ParquetSink) -> None:
        self._install_signals()
        status = asyncio.create_task(self.progress.status_lines())
        flusher = asyncio.create_task(self._flusher(sink))
        self.workers = [asyncio.create_task(self._worker_loop(worker, sink))
                        for _ in range(self.s.concurrency)]
        producer = asyncio.create_task(self._produce(manifest, done, images))
        try:
            await self._wait_workers(producer)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            self._drop_queued()
            # Never cancelled mid-write: a batch it took would be lost from memory (and
            # its thread would commit it anyway). It finishes the write in hand, then stops.
            self._closing = True
            self._flush_now.set()
            await asyncio.gather(flusher, return_exceptions=True)
            await self._final_flush(sink)
            status.cancel()
            self._remove_signals()

    async def _wait_workers(self, producer: asyncio.Task[None]) -> None:
        workers = asyncio.gather(*self.workers)
        stop = asyncio.create_task(self._stop_now.wait())
        waiting: set[asyncio.Future[Any]] = {workers, stop, producer}
        while not (workers.done() or stop.done()):
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if producer in done and not producer.cancelled() and producer.exception():
                exc = producer.exception()
                # A plan that must stop (a conflicting id), or a manifest that could not
                # be read on: no row is lost, stop cleanly.
                self.fatal = exc if isinstance(exc, RunFatal) else RunFatal(
                    f"manifest {self.s.manifest}: reading stopped: {exc}", "manifest",
                    exit_code=2)
                self._stop_now.set()
        if not workers.done():
            producer.cancel()
            if self.fatal is None:  # a stop with grace: rows mid-request get it
                for t in self.workers:
                    if t not in self.worker.in_request:
                        t.cancel()
                await asyncio.wait([workers], timeout=self.s.grace)
            for t in self.workers:
                t.cancel()
        stop.cancel()
        await asyncio.gather(workers, stop, return_exceptions=True)

    async def _produce(self, manifest: Manifest, done: KeySet, images: ImageRefs) -> None:
        plan = Plan(manifest, done, self.s.named_prompts, self.s.limit, self.counters,
                    images=None if self.s.allow_mixed else images, out=self.s.out)
        plan.log_duplicate = lambda row: log.warning(
            "manifest line %d: duplicate id %r skipped (first one kept)", row.line, row.id)
        async for group in plan.groups():  # a stream is read off the loop (plan.py)
            if not group:
                await asyncio.sleep(0)  # a long run of done rows must not starve the loop
                continue
            # Start preparing the image now, once for all of the row's prompts, so it is
            # ready when a worker takes the row (the queue bounds how many are ahead).
            first = group[0]
            prepared = None if first.error else asyncio.ensure_future(
                self.worker.images.load(first))
            for row in group:
                await self.queue.put((row, prepared))
        self.progress.set_total(plan.pending)
        for _ in self.workers:
            await self.queue.put(_DONE)

    def _drop_queued(self) -> None:
        """Rows still queued at a stop stay pending; cancel their image preparation."""
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not None and item[1] is not None:
                item[1].cancel()

    async def _worker_loop(self, worker: Worker, sink: ParquetSink) -> None:
        cap = _BUFFER_FLUSHES * self.s.flush_rows
        while not self.halting:
            while sink.buffered >= cap and not self.halting:  # the disk is slower than us
                self._flush_now.set()
                await asyncio.sleep(0.05)
            item = await self.queue.get()
            if item is None:
                return
            row, prepared = item
            try:
                result = await worker.process(row, prepared)
            except Interrupted:
                return  # the row stays pending for the next run
            except BudgetReached as e:
                if self.budget_stop is None:  # what is in flight finishes; this row waits
                    self.budget_stop = str(e)
                    log.warning("%s; finishing the rows in flight", e)
                    self._stop_now.set()
                return
            except RunFatal as e:
                self.fatal = self.fatal or e
                self._stop_now.set()
                return
            self._keep(result, sink)

    def _keep(self, row: dict[str, Any], sink: ParquetSink) -> None:
        """A finished row: journaled at once (a kill no longer loses it), then counted."""
        try:
            sink.add(row)
        except OSError as e:
            self._output_failed(e, sink.journal.dir if sink.journal else self.s.out)
        self.counters.record(row)
        self.progress.update(row.get("total_tokens") or 0)
        if sink.due:
            self._flush_now.set()

    async def _flusher(self, sink: ParquetSink) -> None:
        """Commit a part when one is due; fsync the journal every ``SYNC_SECONDS``."""
        while not self._closing:
            wait = min(SYNC_SECONDS, sink.seconds_until_due()) if sink.buffered \
                else SYNC_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), wait)
            self._flush_now.clear()
            if self._closing:
                return  # the final flush takes what is buffered
            batch = None
            try:
                batch = sink.take() if sink.due else None
                await asyncio.to_thread(sink.sync)
                if batch is not None:
                    await asyncio.to_thread(sink.write, batch)
            except OSError as e:
                if batch is not None:
                    self._unwritten.append(batch)
                self._output_failed(e, self.s.out)
                return

    async def _final_flush(self, sink: ParquetSink) -> None:
        """What finished and is not committed yet, as one last part (if it can be)."""
        pending = list(self._unwritten)
        batch = Batch([r for b in pending for r in b.rows] + sink.pending_rows(), None)
        try:
            pending.append(sink.take())
            await asyncio.to_thread(sink.write, batch)
            for b in pending:
                Journal.discard(b.segment)
        except OSError as e:
            self.uncommitted = len(batch)
            self._output_failed(e, self.s.out)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(sink.sync)  # the journal may still hold them
        finally:
            sink.close()

    def _output_failed(self, e: OSError, path: Path) -> None:
        if self.output_error is None:  # said once, at the end (cli prints it)
            self.output_error = output_error(e, path)
            self.reserve.release()  # room for the last rows and the run report
            log.debug("output failed: %s; no new requests, rows in flight get %gs",
                      self.output_error.message, self.s.grace)
            self._stop_now.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNAL_EXIT:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNAL_EXIT:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.halting:
            self.stopping = sig
            log.warning("%s: stopping; waiting up to %gs for rows in flight (again to stop now)",
                        sig.name, self.s.grace)
            # Wake the pool: workers stop taking rows; in-flight ones get the grace period.
            self._stop_now.set()
        else:
            for t in self.workers:
                t.cancel()

    def _result(self, opened: Opened) -> RunResult:
        fatal = self.fatal or self.output_error
        if fatal is self.output_error and fatal is not None:
            fatal = RunFatal(f"{fatal.message}; {self.uncommitted} finished rows are not in "
                             "a part yet (the next run recovers them from the journal or "
                             "captions them again)"
                             if self.uncommitted else f"{fatal.message}; every finished row "
                             "was committed", "output", exit_code=fatal.exit_code)
        return conclude(self.s, self.run_id, self.started_at, self.progress, self.stopping,
                        fatal, self.budget_stop, uncommitted=self.uncommitted,
                        errors_kept=self.counters.errors_kept,
                        errors_retried=self.counters.errors_retried,
                        quarantined=[str(p) for p in opened.resume.quarantined])


def conclude(s: Settings, run_id: str, started_at: str, progress: Progress,
             stopping: signal.Signals | None, fatal: RunFatal | None,
             budget_stop: str | None, **extra: Any) -> RunResult:
    """The end of a run, for every engine: exit code, summary, and the run report."""
    if fatal is not None:
        code, reason = fatal.exit_code, "fatal"
    elif budget_stop is not None:
        code, reason = EXIT_BUDGET, "max_cost"
    elif stopping is not None:
        code, reason = SIGNAL_EXIT[stopping], stopping.name.lower()
    else:
        code, reason = EXIT_ROWS_FAILED if progress.c.failed else EXIT_OK, "completed"
    note = fatal.message if fatal else budget_stop
    summary = progress.summary(str(s.out), code, reason, note)
    options = {k: str(v) if isinstance(v, Path) else v
               for k, v in asdict(s).items() if k != "api_key"}  # never the key
    c = progress.c
    # OUT/_runs/<run id>.json: what this run did, for operators and `status`.
    try:
        write_run_report(s.out, run_id, {
            "run_id": run_id, "started_at": started_at, "ended_at": now_utc().isoformat(),
            "exit_code": code, "note": note,
            "interrupted": stopping.name if stopping else None,
            **progress.stats(), "skipped_duplicate": c.skipped_duplicate,
            "copied_from_identical": c.copies, "error_classes": dict(c.error_classes),
            "top_errors": dict(c.reasons.most_common(10)),
            "latency_s": c.latency.percentiles(), "ttft_s": c.ttft.percentiles(),
            "options": options, **extra})
    except OSError as e:
        log.warning("the run report was not written: %s", output_error(e, s.out).message)
    return RunResult(code, c, summary, note)


def check_template(prompt: str, manifest: Manifest) -> None:
    """A ``--prompt`` template may only name columns the manifest has: say so up front."""
    known = set(manifest.columns) | {"id", "image"} | set(manifest.extra_columns)
    for name in template_fields(prompt):
        if name not in known:
            raise RunFatal(f"--prompt refers to column {{{name}}}, which manifest "
                           f"{manifest.path} does not have (columns: "
                           f"{', '.join(manifest.columns)})", "config", exit_code=2)


def count_lines(path: Path) -> int:
    """Physical lines, for the progress estimate (1 GB/s; no parsing)."""
    n = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
    return n


async def run(settings: Settings) -> RunResult:
    if settings.engine == "ray":
        from .engine_ray import run_ray

        # Blocking on purpose: Ray does the work and this loop has nothing else to do;
        # run_ray installs its own SIGINT/SIGTERM handlers while it runs.
        return run_ray(settings)
    with locked(settings.out):
        return await Run(settings).execute()
