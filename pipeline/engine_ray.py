"""``--engine ray``: the same job on a Ray cluster (Ray Data), with the same OUT.

The driver (this process) does what only one process may do: it holds the OUT lock,
loads and repairs the checkpoint, writes every Parquet part through ``ParquetSink``
(same schema, atomic parts, merge at the end), counts, shows progress and writes the
run report. Ray Data does the rest as a streaming dataset::

    plan_chunks (1 task on the driver's node: manifest -> pending rows, in chunks)
      -> CaptionActor x N (each: the local engine's worker stack, 1/N of the limits)
      -> driver: iter_batches -> ParquetSink

* Resume: keys already in OUT are dropped before any work is dispatched (a sorted
  array of stable 64-bit key hashes in the object store); the output is the local
  engine's, so a run may switch engines between resumes.
* Faults: Ray restarts a killed actor and retries its chunk (Ray Data's defaults:
  ``max_restarts=-1``, ``max_task_retries=-1``), so a dead actor costs the requests it
  had in flight, not rows; whatever a failed run left pending, a rerun captions.
* Stops: a ``RunFatal`` in any actor stops the run with its exit code, without writing
  the rows in flight; ``--max-cost`` (split evenly over the actors) stops taking rows
  and drains for at most ``--grace`` seconds (exit 5); SIGINT/SIGTERM stop at once,
  flush what arrived and exit 130/143 (rows in flight on the cluster are not waited
  for: they stay pending).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .checkpoint import KeySet, key_hash
from .dataset import close_dataset, open_dataset
from .engine_ray_actor import CaptionActor, Share, decode_rows, plan_chunks, stable_key_hash
from .errors import PipelineError, RunFatal, output_error
from .manifest import Manifest
from .progress import Counters, Progress
from .records import now_utc
from .runner import (
    _SIGNAL_EXIT,
    EXIT_FATAL,
    RunResult,
    check_template,
    conclude,
    count_lines,
    locked,
)
from .settings import Settings
from .sink import ParquetSink

__all__ = ["run_ray", "done_key_hashes"]

log = logging.getLogger("pipeline")

CPUS_PER_ACTOR = 1          # what Ray reserves for each caption actor...
IMAGE_THREADS = 1           # ...and what its image preparation uses: N actors ~ N cores
CALLS_PER_ACTOR = 2         # chunks one actor works on at once (no idle tail per chunk)
MISSING_RAY = "--engine ray needs Ray: pip install 'caption-pipeline[ray]'"


def run_ray(settings: Settings, actors: int | None = None) -> RunResult:
    """Caption ``settings.manifest`` into ``settings.out`` on Ray; blocking."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise RunFatal(MISSING_RAY, "config", exit_code=2) from None
    # Paths as every node sees them: actors do not share the driver's working directory.
    settings = replace(settings, manifest=settings.manifest.resolve(),
                       out=settings.out.resolve())
    with locked(settings.out):
        return RayRun(settings, actors).execute()


def done_key_hashes(parts: list[Path], retry_errors: bool) -> np.ndarray:
    """Sorted stable hashes of the keys OUT holds (only ok rows with ``retry_errors``)."""
    chunks = []
    for part in parts:
        t = pq.ParquetFile(part).read(columns=["id", "prompt_name", "status"])
        ids, names, status = (t[c].to_pylist() for c in ("id", "prompt_name", "status"))
        chunks.append(np.fromiter(
            (stable_key_hash(i or "", n or "") for i, n, st in zip(ids, names, status)
             if not retry_errors or st == "ok"), dtype=np.int64))
    return np.unique(np.concatenate(chunks)) if chunks else np.empty(0, np.int64)


class _Interrupt(BaseException):
    """Raised by the signal handler to leave a blocking wait for the next batch (a
    BaseException, like KeyboardInterrupt, so Ray Data does not log it as its own bug)."""


class RayRun:
    def __init__(self, settings: Settings, actors: int | None) -> None:
        self.s = settings
        self.requested_actors = actors or getattr(settings, "ray_actors", None)
        self.run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.counters = Counters()
        self.stopping: signal.Signals | None = None
        self.fatal: RunFatal | None = None
        self.budget_stop: str | None = None
        self.started_at = now_utc().isoformat()
        self.written = KeySet()  # keys written by this run: one row per key, whatever Ray retried
        self.actors = 0
        self._waiting = False

    @property
    def halting(self) -> bool:
        return (self.stopping is not None or self.fatal is not None
                or self.budget_stop is not None)

    def execute(self) -> RunResult:
        import ray

        s = self.s
        manifest = Manifest(s.manifest, s.manifest_format)
        for p in s.named_prompts:
            check_template(p.template, manifest)
        opened = open_dataset(s, manifest, self.run_id)
        resume = opened.resume
        done = done_key_hashes(resume.parts, s.retry_errors)
        sink = ParquetSink(s.out, opened.schema, self.run_id, s.flush_rows, s.flush_seconds)
        self.progress = Progress(self.counters, s.progress and sys.stderr.isatty(),
                                 s.status_interval, json_lines=s.log_format == "json")
        rows = (count_lines(s.manifest) - 1) * len(s.named_prompts)  # as runner.Run
        estimate = max(0, rows - len(resume.done))
        self.progress.set_total(min(estimate, s.limit) if s.limit is not None else estimate)
        started = False
        try:
            started = _connect(getattr(s, "ray_address", None))
            with _quiet_ray_data(), _data_context(), warnings.catch_warnings():
                # A chunk is one block, so a short run has fewer inputs than actors.
                warnings.filterwarnings("ignore", "The minimum number of concurrent actors")
                try:
                    ds = self._dataset(ray.put(done), manifest.extra_columns)
                except Exception as e:  # e.g. a Ray Data API this version lacks: one line
                    self.fatal = _unwrap(e)
                else:
                    with self._signals():
                        self._consume(ds, sink)
        finally:
            try:
                sink.write(sink.take())
            except OSError as e:  # the journal may still hold them: the next run recovers
                self.fatal = self.fatal or output_error(e, s.out)
            sink.close()
            self.progress.close()
            if started:
                ray.shutdown()
        if not self.halting:
            close_dataset(s, sink.parts, self.run_id, opened.schema, resume.rows_retried > 0)
        return self._result()

    def _dataset(self, done_ref: Any, extra_columns: list[str]) -> Any:
        import ray
        from ray.data import ActorPoolStrategy

        s = self.s
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = self.requested_actors or max(1, cpus // CPUS_PER_ACTOR)
        self.actors = n = max(1, min(n, s.concurrency))
        per = max(1, s.concurrency // n)
        split = lambda v: None if v is None else v / n  # noqa: E731
        share = Share(per, split(s.rpm), split(s.tpm), split(s.itpm), split(s.otpm),
                      split(s.max_cost), IMAGE_THREADS, tuple(extra_columns))
        chunk_rows = max(4, min(256, per))
        log.debug("ray: %d actors x %d requests in flight, chunks of %d rows", n, per,
                  chunk_rows)
        # The planning task reads the manifest where the driver does: on this node.
        pin = f"node:{ray.util.get_node_ip_address()}"
        place = {"resources": {pin: 0.001}} if pin in ray.cluster_resources() else {}
        ds = ray.data.from_items([{"shard": 0}]).map_batches(
            plan_chunks, batch_size=1, batch_format="pyarrow", num_cpus=0,
            fn_kwargs={"manifest": str(s.manifest), "fmt": s.manifest_format,
                       "prompts": s.named_prompts,
                       "limit": s.limit, "done": [done_ref], "chunk_rows": chunk_rows},
            **place)
        pool, remote = _actor_pool(ActorPoolStrategy, n)
        return ds.map_batches(
            CaptionActor, compute=pool, batch_size=1, batch_format="pyarrow",
            num_cpus=CPUS_PER_ACTOR, fn_constructor_kwargs={"settings": s, "share": share},
            **remote)

    def _consume(self, ds: Any, sink: ParquetSink) -> None:
        deadline: float | None = None  # set when the budget is reached: drain, then stop
        batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
        try:
            while not (self.fatal or self.stopping):
                if deadline is not None and time.monotonic() > deadline:
                    break
                self._waiting = True
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                finally:
                    self._waiting = False
                for kind, payload, info in zip(*(batch.column(c).to_pylist()
                                                 for c in ("kind", "payload", "info"))):
                    self._on_chunk(kind, payload, info, sink)
                if self.budget_stop is not None and deadline is None:
                    deadline = time.monotonic() + self.s.grace
        except _Interrupt:
            pass
        except OSError as e:  # a write to OUT failed: stop taking chunks (exit 6)
            self.fatal = output_error(e, self.s.out)
        except Exception as e:  # Ray's errors wrap ours; one line, exit 3
            self.fatal = _unwrap(e)
        finally:
            with contextlib.suppress(Exception):
                batches.close()  # type: ignore[attr-defined]  # stops the actors

    def _on_chunk(self, kind: str, payload: bytes | None, info: str | None,
                  sink: ParquetSink) -> None:
        if kind == "stats":
            counts = json.loads(payload or b"{}")
            self.counters.skipped_done += counts["skipped_done"]
            self.counters.skipped_duplicate += counts["skipped_duplicate"]
            for line, rid in counts["duplicates"]:
                log.warning("manifest line %d: duplicate id %r skipped (first one kept)",
                            line, rid)
            if counts["skipped_duplicate"] > len(counts["duplicates"]):
                log.warning("... and %d more duplicate ids skipped",
                            counts["skipped_duplicate"] - len(counts["duplicates"]))
            self.progress.set_total(counts["pending"])
        if kind == "rows" and payload:
            for row in decode_rows(payload):
                h = key_hash(row["id"], row["prompt_name"])
                if h in self.written:
                    continue  # a chunk Ray ran twice: the first row of a key wins
                self.written.add(h)
                sink.add(row)
                self.counters.record(row)
                self.progress.update(row.get("total_tokens") or 0)
            sink.sync()  # the chunk's rows are durable before the next wait
            if sink.due:
                sink.write(sink.take())
        if info:
            self._on_halt(json.loads(info))

    def _on_halt(self, halt: dict[str, Any]) -> None:
        if "fatal" in halt and self.fatal is None:
            self.fatal = RunFatal(halt["fatal"], halt.get("error_class"),
                                  exit_code=halt.get("exit_code", EXIT_FATAL))
        elif "budget" in halt and self.budget_stop is None:
            self.budget_stop = halt["budget"]
            log.warning("%s; finishing the rows in flight (at most %gs)", halt["budget"],
                        self.s.grace)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNAL_EXIT}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.stopping is None and not (self.fatal or self.budget_stop):
            self.stopping = sig
            log.warning("%s: stopping; rows in flight on the cluster stay pending "
                        "(rerun to resume)", sig.name)
        if self._waiting:
            raise _Interrupt

    def _result(self) -> RunResult:
        return conclude(self.s, self.run_id, self.started_at, self.progress, self.stopping,
                        self.fatal, self.budget_stop, engine="ray", ray_actors=self.actors)


def _connect(address: str | None) -> bool:
    """Join ``address`` (or start a local Ray); True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    try:
        if address:
            # Ship this package, so every node runs the driver's version of the code.
            import pipeline

            ray.init(address=address, runtime_env={"py_modules": [pipeline]}, **common)
        else:  # "local": a new instance, even where a `ray start` cluster runs
            ray.init(address="local", include_dashboard=False, **common)
    except Exception as e:  # one line naming the cluster, exit 2
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise RunFatal(f"--engine ray: cannot start or join {where}: {first}", "config",
                       exit_code=2) from None
    return True


def _actor_pool(strategy: Any, n: int) -> tuple[Any, dict[str, Any]]:
    """A fixed pool of ``n`` actors, each running ``CALLS_PER_ACTOR`` chunks at once."""
    import inspect

    params = inspect.signature(strategy).parameters
    if "enable_true_multi_threading" in params:
        return strategy(size=n, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                        enable_true_multi_threading=True), {}
    return strategy(size=n), {"max_concurrency": CALLS_PER_ACTOR}  # older Ray Data


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Every chunk its own block (so one task = one chunk); no Ray progress bars."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.target_max_block_size, ctx.enable_progress_bars
    ctx.target_max_block_size, ctx.enable_progress_bars = 1, False
    try:
        yield
    finally:
        ctx.target_max_block_size, ctx.enable_progress_bars = saved


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's INFO lines on the console would interleave with our progress (-v: kept)."""
    logger = logging.getLogger("ray.data")
    saved, targets = logger.level, [logger, *logger.handlers]
    if not log.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    for t in targets:
        t.addFilter(_not_progress_bars)
    try:
        yield
    finally:
        logger.setLevel(saved)
        for t in targets:
            t.removeFilter(_not_progress_bars)


def _not_progress_bars(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Progress bars disabled")  # we show our own


def _unwrap(e: BaseException) -> RunFatal:
    """Our own error if Ray wrapped one (``cause`` chain), else Ray's, in one line."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, RunFatal):
            return seen
        if isinstance(seen, PipelineError):
            return RunFatal(seen.message, seen.error_class, exit_code=EXIT_FATAL)
        seen = getattr(seen, "cause", None) or seen.__cause__
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return RunFatal(f"ray: {type(e).__name__}: {first}", "ray", exit_code=EXIT_FATAL)
