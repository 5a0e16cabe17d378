"""One run over OUT, the same for every engine: the session owns everything but captioning.

The session holds the lock on OUT, checks the descriptor limit, opens the dataset
(journal recovery, checkpoint, quarantine, schema, ``_dataset.json``), plans which keys
are pending (one planner, ``sources.plan``), shows progress, keeps every finished row
(journal at once, Parquet parts in batches: ``store.sink``), handles signals, and ends
the run: last flush, merge, run report, summary and exit code. An engine (``engines/``)
only turns the plan's pending rows into result rows, calling ``keep`` for each and
watching ``halting``.

Stopping (``Stop``): SIGINT/SIGTERM/SIGHUP, a write to OUT that fails, and
``--max-cost`` stop taking rows and give the rows in flight ``--grace`` seconds; a run
fatal error (a wrong key, a wrong endpoint, a conflicting manifest) stops at once and
writes nothing for the rows in flight, so they stay pending. A second signal cancels
at once (finished rows are still flushed). Memory stays flat: the manifest is streamed
and the sink's buffer is capped (``room``).
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
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from ..errors import RunFatal, output_error
from ..images.dedupe import ImageIndex
from ..quality import Gate, RepeatCounter
from ..records import ResultRow, now_utc
from ..settings import Settings
from ..sources.base import Source
from ..sources.choose import open_source
from ..sources.plan import Plan
from ..store.captions import CaptionIndex
from ..store.dataset import close_dataset, open_dataset
from ..store.journal import SYNC_SECONDS, Journal
from ..store.sink import Batch, ParquetSink, write_run_report
from ..wire.options import template_fields
from .chain import Chain
from .preflight import Reserve, check_output, fit_descriptors, warn_if_low_space
from .progress import Counters, Progress

__all__ = ["EXIT_BUDGET", "Engine", "RunResult", "RunSession", "SIGNAL_EXIT", "Stop",
           "check_template", "count_lines", "locked"]

log = logging.getLogger("pipeline")

EXIT_OK, EXIT_ROWS_FAILED, EXIT_LOCKED, EXIT_BUDGET = 0, 1, 4, 5
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
BUFFER_FLUSHES = 4  # rows buffered at most, in flushes' worth, while a part is written


class Stop(Enum):
    """Why a run stops taking rows (the first reason wins)."""

    SIGNAL = "signal"    # SIGINT, SIGTERM, SIGHUP: rows in flight get the grace
    OUTPUT = "output"    # a write to OUT failed (exit 6): the grace, then stop
    BUDGET = "budget"    # --max-cost reached (exit 5): the grace, then stop
    FATAL = "fatal"      # every row would fail the same way: stop now, write nothing more

    @property
    def with_grace(self) -> bool:
        return self is not Stop.FATAL


class Engine(Protocol):
    """Turns the session's pending rows into result rows (``session.keep``)."""

    name: str

    async def run(self, session: RunSession) -> None: ...


@dataclass
class RunResult:
    exit_code: int
    counters: Counters
    summary: str
    fatal: str | None = None


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on OUT for the whole run (released by the OS when the
    process dies, so a killed run never leaves a stale lock; a second run exits 4)."""
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


class RunSession:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.s = settings
        self.engine = engine
        self.run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.counters = Counters()
        self.started_at = now_utc().isoformat()
        self.stop: Stop | None = None
        self.signal: signal.Signals | None = None
        self.fatal: RunFatal | None = None     # FATAL or OUTPUT: the one line at the end
        self.budget_note: str | None = None
        self.stopped = asyncio.Event()         # set with the first stop
        self.cancel_now = asyncio.Event()      # a second signal: no more grace
        self._flush_now = asyncio.Event()
        self._closing = False
        self._unwritten: list[Batch] = []      # batches whose part could not be committed
        self.uncommitted = 0                   # finished rows no part holds at the end

    # ---------------------------------------------------------------- for the engines

    @property
    def settings(self) -> Settings:
        return self.s

    @property
    def halting(self) -> bool:
        return self.stop is not None

    def halt(self, why: Stop, error: RunFatal | None = None, note: str | None = None) -> None:
        """Stop taking rows (the first reason wins; a fatal one also ends the grace)."""
        if self.stop is None:
            self.stop, self.fatal = why, error
            if why is Stop.BUDGET:
                self.budget_note = note
                log.warning("%s; finishing the rows in flight", note)
            self.stopped.set()
        elif why is Stop.FATAL and self.stop.with_grace:
            self.cancel_now.set()  # e.g. the key failed while draining after a signal

    def keep(self, row: ResultRow) -> None:
        """A finished row: journaled at once (a kill no longer loses it), then counted."""
        try:
            self.sink.add(row.to_record())
        except OSError as e:
            self._output_failed(e, self.sink.journal.dir if self.sink.journal else self.s.out)
        self.counters.record(row)
        self.progress.update(row.total_tokens or 0)
        if self.sink.due:
            self._flush_now.set()

    async def room(self) -> None:
        """Wait while the sink holds more than it may (a disk slower than the rows)."""
        cap = BUFFER_FLUSHES * self.s.flush_rows
        while self.sink.buffered >= cap and not self.halting:
            self._flush_now.set()
            await asyncio.sleep(0.05)

    # ---------------------------------------------------------------- the run

    async def execute(self) -> RunResult:
        with locked(self.s.out):
            return await self._execute()

    async def _execute(self) -> RunResult:
        manifest = await asyncio.to_thread(open_source, self.s.manifest, self.s.manifest_format,
                                           self.s.max_file_bytes)
        for p in self.s.named_prompts:
            check_template(p.template, manifest)
        if self.engine.name == "local":  # each request holds a descriptor here
            self.s = replace(self.s, concurrency=fit_descriptors(self.s.concurrency))
        self.opened = await asyncio.to_thread(open_dataset, self.s, manifest, self.run_id)
        resume = self.opened.resume
        self.counters.errors_retried = resume.rows_retried
        self.counters.errors_kept = resume.rows_error - resume.rows_retried
        self.progress = Progress(self.counters, self.s.progress and sys.stderr.isatty(),
                                 self.s.status_interval, json_lines=self.s.log_format == "json")
        estimate = await self._estimate(manifest)
        warn_if_low_space(self.s.out, estimate or 0)
        self.plan = Plan(manifest, resume.done, self.s.named_prompts, self.s.limit,
                         self.counters.plan,
                         images=None if self.s.allow_mixed else resume.images, out=self.s.out)
        self.plan.log_duplicate = lambda row: log.warning(
            "manifest line %d: duplicate id %r skipped (first one kept)", row.line, row.id)
        self.reserve = Reserve(self.s.out)
        # CAPTION_JOURNAL=0: parts only (how make bench-crash measures what it saves).
        self.sink = ParquetSink(self.s.out, self.opened.schema, self.run_id, self.s.flush_rows,
                                self.s.flush_seconds,
                                journal=os.environ.get("CAPTION_JOURNAL", "1") != "0")
        try:
            await self._run_engine()
        finally:
            self.reserve.release()
            self.progress.close()
            manifest.close()
        if not self.halting:
            replaced = resume.rows_retried > 0 or getattr(self.engine, "replaced_errors", False)
            await asyncio.to_thread(close_dataset, self.s, self.sink.parts, self.run_id,
                                    self.opened.schema, replaced)
        return self._result()

    async def _estimate(self, manifest: Source) -> int | None:
        """Rows this run will caption, for the progress bar (None: a stream, unknown)."""
        if manifest.one_shot:  # standard input cannot be read twice: the total stays open
            return None
        records = await asyncio.to_thread(manifest.estimate)
        if records is None:  # a folder or shards: counted as they are read
            return None
        rows = records * len(self.s.named_prompts)  # one row per image and prompt
        estimate = max(0, rows - len(self.opened.resume.done))
        if self.s.limit is not None:
            estimate = min(estimate, self.s.limit)
        self.progress.set_total(estimate)
        return estimate

    async def dedupe_index(self) -> ImageIndex | None:
        """What OUT holds per dedup key, for engines that copy identical images."""
        if not self.s.dedupe:
            return None
        index = await asyncio.to_thread(ImageIndex, self.opened.resume.parts)
        return index if len(index) else None

    async def chain(self) -> Chain | None:
        """Chained prompts' upstream captions: this run's, and OUT's (None: no chain)."""
        if not self.s.chained:
            return None
        chain = Chain(self.s.named_prompts, None)
        parts = self.opened.resume.parts
        if parts:
            chain.index = await asyncio.to_thread(CaptionIndex, parts, chain.upstream_names)
        return chain

    async def quality_gate(self) -> Gate | None:
        """The quality gate of this run (None when every check is off). The repeat
        check starts from the captions OUT holds: repeats count across the dataset."""
        q = self.s.quality
        if not q.active:
            return None
        repeats = None
        if q.max_repeats:
            repeats = RepeatCounter()
            await asyncio.to_thread(repeats.add_parts, self.opened.resume.parts)
        return Gate(q, repeats)

    async def _run_engine(self) -> None:
        self._install_signals()
        status = asyncio.create_task(self.progress.status_lines())
        flusher = asyncio.create_task(self._flusher())
        try:
            await self.engine.run(self)
        except RunFatal as e:  # an engine's own fatal error (Ray could not start, ...)
            self.halt(Stop.FATAL, e)
        finally:
            # Never cancelled mid-write: a batch it took would be lost from memory (and
            # its thread would commit it anyway). It finishes the write in hand, then stops.
            self._closing = True
            self._flush_now.set()
            await asyncio.gather(flusher, return_exceptions=True)
            await self._final_flush()
            status.cancel()
            self._remove_signals()

    # ---------------------------------------------------------------- the sink

    async def _flusher(self) -> None:
        """Commit a part when one is due; fsync the journal every ``SYNC_SECONDS``."""
        sink = self.sink
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

    async def _final_flush(self) -> None:
        """What finished and is not committed yet, as one last part (if it can be)."""
        sink = self.sink
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
        """A write to OUT failed: stop (exit 6), said once. It outranks a signal or the
        budget that stopped the run first (rows were not committed: that is what the
        user must hear), not a fatal error, which already says why the run stopped."""
        if self.stop in (Stop.OUTPUT, Stop.FATAL):
            return
        self.reserve.release()  # room for the last rows and the run report
        error = output_error(e, path)
        log.debug("output failed: %s; no new requests, rows in flight get %gs",
                  error.message, self.s.grace)
        first = self.stop is None
        self.stop, self.fatal = Stop.OUTPUT, error
        if first:
            self.stopped.set()

    # ---------------------------------------------------------------- signals

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
            self.signal = sig
            log.warning("%s: stopping; waiting up to %gs for rows in flight (again to stop now)",
                        sig.name, self.s.grace)
            self.halt(Stop.SIGNAL)
        else:
            self.cancel_now.set()

    # ---------------------------------------------------------------- the end

    def _result(self) -> RunResult:
        fatal = self.fatal
        if self.stop is Stop.OUTPUT and fatal is not None:
            fatal = RunFatal(f"{fatal.message}; {self.uncommitted} finished rows are not in "
                             "a part yet (the next run recovers them from the journal or "
                             "captions them again)"
                             if self.uncommitted else f"{fatal.message}; every finished row "
                             "was committed", "output", exit_code=fatal.exit_code)
        resume = self.opened.resume
        return conclude(self.s, self.run_id, self.started_at, self.progress, self.signal,
                        fatal, self.budget_note if self.stop is Stop.BUDGET else None,
                        engine=self.engine.name, uncommitted=self.uncommitted,
                        errors_kept=self.counters.errors_kept,
                        errors_retried=self.counters.errors_retried,
                        quarantined=[str(p) for p in resume.quarantined],
                        **getattr(self.engine, "report", {}))


def conclude(s: Settings, run_id: str, started_at: str, progress: Progress,
             stopping: signal.Signals | None, fatal: RunFatal | None,
             budget_stop: str | None, **extra: Any) -> RunResult:
    """Exit code, summary and the run report (``OUT/_runs/<run id>.json``)."""
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
    try:
        write_run_report(s.out, run_id, {
            "run_id": run_id, "started_at": started_at, "ended_at": now_utc().isoformat(),
            "exit_code": code, "note": note,
            "interrupted": stopping.name if stopping else None,
            **progress.stats(), "skipped_duplicate": c.skipped_duplicate,
            "copied_from_identical": c.copies, "error_classes": dict(c.error_classes),
            "reasked": c.reasked, "reask_cost_usd": round(c.reask_cost_usd, 6),
            "quality_flags": dict(c.flags),
            "top_errors": dict(c.reasons.most_common(10)),
            "latency_s": c.latency.percentiles(), "ttft_s": c.ttft.percentiles(),
            "options": options, **extra})
    except OSError as e:
        log.warning("the run report was not written: %s", output_error(e, s.out).message)
    return RunResult(code, c, summary, note)


def check_template(prompt: str, manifest: Source) -> None:
    """A ``--prompt`` template may only name columns the manifest has: say so up front."""
    known = set(manifest.columns) | {"id", "image"} | set(manifest.extra_columns)
    for name in template_fields(prompt):
        if name.startswith("caption."):
            continue  # a prompt's caption: checked by sources.chain.order
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
