"""The run: manifest → bounded queue → a fixed pool of workers → sink, with shutdown.

* Memory stays flat: the manifest is streamed, the queue holds at most 2 × concurrency
  rows, and finished rows leave memory at every flush.
* Exactly one row per key: keys already in OUT are skipped (the checkpoint), a
  duplicate id in the manifest is skipped and counted, and only the sink writes.
* Stopping: SIGINT/SIGTERM stop taking rows, give in-flight requests ``grace`` seconds,
  flush what finished, and exit 130/143; a second signal cancels at once (still
  flushing). A ``RunFatal`` from a worker cancels the in-flight rows without writing
  them, so they stay pending for the rerun.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, ImageIndex, KeySet
from .cost import BudgetReached
from .errors import RunFatal
from .images import default_executor
from .manifest import Manifest
from .options import template_fields
from .plan import Plan
from .progress import Counters, Progress
from .ratelimit import Budgets
from .records import ManifestRow, PreparedImage, now_utc, output_schema
from .settings import Settings
from .sink import ParquetSink, compact, write_run_report
from .stack import build_worker
from .worker import Interrupted, Worker

log = logging.getLogger("pipeline")

EXIT_OK, EXIT_ROWS_FAILED, EXIT_FATAL, EXIT_LOCKED, EXIT_BUDGET = 0, 1, 3, 4, 5
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
_DONE = None  # queue sentinel


@dataclass
class RunResult:
    exit_code: int
    counters: Counters
    summary: str
    fatal: str | None = None


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on OUT for the whole run."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
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
        self.budget_stop: str | None = None  # --max-cost reached: no new rows, exit 5
        self.queue: asyncio.Queue[tuple[ManifestRow, asyncio.Future[PreparedImage] | None] | None]
        self.queue = asyncio.Queue(2 * settings.concurrency)
        self.results: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.workers: list[asyncio.Task[None]] = []
        self._stop_now = asyncio.Event()
        self.started_at = now_utc().isoformat()

    @property
    def halting(self) -> bool:
        return (self.stopping is not None or self.fatal is not None
                or self.budget_stop is not None)

    async def execute(self) -> RunResult:
        manifest = Manifest(self.s.manifest)
        for p in self.s.named_prompts:
            check_template(p.template, manifest)
        resume = await asyncio.to_thread(Checkpoint(self.s.out).load, self.s.retry_errors)
        if resume.duplicates_removed or resume.temp_files_removed:
            log.warning("repaired %s: removed %d duplicate rows and %d temporary files",
                        self.s.out, resume.duplicates_removed, resume.temp_files_removed)
        sink = ParquetSink(self.s.out, output_schema(manifest.extra_columns), self.run_id,
                           self.s.flush_rows, self.s.flush_seconds)
        show_bar = self.s.progress and sys.stderr.isatty()
        self.progress = Progress(self.counters, show_bar, self.s.status_interval,
                                 json_lines=self.s.log_format == "json")
        lines = await asyncio.to_thread(count_lines, self.s.manifest)
        rows = (lines - 1) * len(self.s.named_prompts)  # one row per image and prompt
        estimate = max(0, rows - len(resume.done))
        self.progress.set_total(min(estimate, self.s.limit) if self.s.limit is not None
                                else estimate)
        async with contextlib.AsyncExitStack() as stack:
            worker = await self._worker(stack, resume.parts)
            await self._run_pool(manifest, resume.done, worker, sink)
        self.progress.close()
        if not self.halting:
            await asyncio.to_thread(compact, self.s.out, sink.parts, self.run_id)
            if self.s.retry_errors:  # the new rows replace the error rows they retried
                await asyncio.to_thread(Checkpoint(self.s.out).repair)
        return self._result()

    async def _worker(self, stack: contextlib.AsyncExitStack, parts: list[Path]) -> Worker:
        s = self.s
        lookup = None
        if s.dedupe:  # identical images already captioned in OUT are copied, not resent
            index = await asyncio.to_thread(ImageIndex, parts)
            lookup = index.lookup if len(index) else None
        self.worker = await build_worker(
            stack, s, concurrency=s.concurrency, budgets=Budgets(s.rpm, s.tpm, s.itpm, s.otpm),
            max_cost=s.max_cost, executor=default_executor(), lookup_done=lookup,
            should_stop=lambda: self.halting)
        self.progress.waiting = self.worker.limiter.describe_wait  # long waits are shown
        return self.worker

    async def _run_pool(self, manifest: Manifest, done: KeySet, worker: Worker,
                        sink: ParquetSink) -> None:
        self._install_signals()
        status = asyncio.create_task(self.progress.status_lines())
        sink_task = asyncio.create_task(self._sink_loop(sink))
        self.workers = [asyncio.create_task(self._worker_loop(worker))
                        for _ in range(self.s.concurrency)]
        producer = asyncio.create_task(self._produce(manifest, done))
        try:
            await self._wait_workers(producer)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            self._drop_queued()
            await self.results.put(_DONE)
            await sink_task
            status.cancel()
            self._remove_signals()

    async def _wait_workers(self, producer: asyncio.Task[None]) -> None:
        workers = asyncio.gather(*self.workers)
        stop = asyncio.create_task(self._stop_now.wait())
        waiting: set[asyncio.Future[Any]] = {workers, stop, producer}
        while not (workers.done() or stop.done()):
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if producer in done and not producer.cancelled() and producer.exception():
                # The manifest could not be read on: no row is lost, stop cleanly.
                exc = producer.exception()
                self.fatal = RunFatal(f"manifest {self.s.manifest}: reading stopped: {exc}",
                                      "manifest", exit_code=2)
                self._stop_now.set()
        if not workers.done():
            producer.cancel()
            if self.fatal is None:  # a signal: rows mid-request get the grace, others go now
                for t in self.workers:
                    if t not in self.worker.in_request:
                        t.cancel()
                # A budget stop lets the requests it reserved cost for finish (each is
                # one attempt, bounded by the read timeout); a signal gives the grace.
                await asyncio.wait([workers],
                                   timeout=None if self.budget_stop and not self.stopping
                                   else self.s.grace)
            for t in self.workers:
                t.cancel()
        stop.cancel()
        await asyncio.gather(workers, stop, return_exceptions=True)

    async def _produce(self, manifest: Manifest, done: KeySet) -> None:
        plan = Plan(manifest, done, self.s.named_prompts, self.s.limit, self.counters)
        plan.log_duplicate = lambda row: log.warning(
            "manifest line %d: duplicate id %r skipped (first one kept)", row.line, row.id)
        for group in plan:
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

    async def _worker_loop(self, worker: Worker) -> None:
        while not self.halting:
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
            await self.results.put(result)

    async def _sink_loop(self, sink: ParquetSink) -> None:
        while True:
            try:
                item = await asyncio.wait_for(self.results.get(), sink.seconds_until_due() + 0.01)
            except TimeoutError:
                item = ...  # time-based flush
            if item is None:
                break
            if isinstance(item, dict):
                sink.add(item)
                self.counters.record(item)
                self.progress.update(item.get("total_tokens") or 0)
            if sink.due:
                await asyncio.to_thread(sink.write, sink.take())
        await asyncio.to_thread(sink.write, sink.take())

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in _SIGNAL_EXIT:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in _SIGNAL_EXIT:
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

    def _result(self) -> RunResult:
        return conclude(self.s, self.run_id, self.started_at, self.progress, self.stopping,
                        self.fatal, self.budget_stop)


def conclude(s: Settings, run_id: str, started_at: str, progress: Progress,
             stopping: signal.Signals | None, fatal: RunFatal | None,
             budget_stop: str | None, **extra: Any) -> RunResult:
    """The end of a run, for every engine: exit code, summary, and the run report."""
    summary = progress.summary(str(s.out))
    if fatal is not None:
        code = fatal.exit_code
    elif budget_stop is not None:
        code = EXIT_BUDGET
    elif stopping is not None:
        code = _SIGNAL_EXIT[stopping]
    else:
        code = EXIT_ROWS_FAILED if progress.c.failed else EXIT_OK
    note = fatal.message if fatal else budget_stop
    options = {k: str(v) if isinstance(v, Path) else v
               for k, v in asdict(s).items() if k != "api_key"}  # never the key
    c = progress.c
    # OUT/_runs/<run id>.json: what this run did, for operators and `status`.
    write_run_report(s.out, run_id, {
        "run_id": run_id, "started_at": started_at, "ended_at": now_utc().isoformat(),
        "exit_code": code, "note": note, "interrupted": stopping.name if stopping else None,
        **progress.stats(), "skipped_duplicate": c.skipped_duplicate,
        "copied_from_identical": c.copies, "error_classes": dict(c.error_classes),
        "top_errors": dict(c.reasons.most_common(10)),
        "latency_s": c.latency.percentiles(), "ttft_s": c.ttft.percentiles(),
        "options": options, **extra})
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
