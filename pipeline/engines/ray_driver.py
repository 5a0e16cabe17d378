"""``--engine ray``: an engine of the run session that captions on a Ray cluster (Ray Data).

The session (this process) does what only one process may do: it holds the OUT
lock, opens the dataset, keeps every row (journal, Parquet parts), counts, shows
progress and ends the run. This engine moves the work as a streaming dataset::

    plan_chunks (1 task on the driver's node: the one planner over the manifest)
      -> CaptionActor x N (each: the local engine's worker stack, 1/N of the limits)
      -> here: each batch read in a daemon thread -> session.keep

* Resume: the session's set of done keys (the key hash is the same in every process)
  goes to the planning task through the object store; the output is the local
  engine's, so a run may switch engines between resumes.
* Faults: Ray restarts a killed actor and retries its chunk (Ray Data's defaults:
  ``max_restarts=-1``, ``max_task_retries=-1``), so a dead actor costs the requests it
  had in flight, not rows; a chunk run twice is kept once (the first row of a key).
* Stops: a ``RunFatal`` in any actor stops the run with its exit code without writing
  the rows in flight; ``--max-cost`` (split evenly over the actors) stops taking rows
  and drains for at most ``--grace`` seconds; a signal or a failed write stops at once
  (rows in flight on the cluster are not waited for: they stay pending).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from ..errors import PipelineError, RunFatal
from ..keys import KeySet, key_hash
from ..run.session import RunSession, Stop
from ..settings import Secret, Settings
from .ray_actor import CaptionActor, Share, decode_rows, plan_chunks

__all__ = ["RayEngine"]

log = logging.getLogger("pipeline")

CPUS_PER_ACTOR = 1          # what Ray reserves for each caption actor...
IMAGE_THREADS = 1           # ...and what its image preparation uses: N actors ~ N cores
CALLS_PER_ACTOR = 2         # chunks one actor works on at once (no idle tail per chunk)
MISSING_RAY = "--engine ray needs Ray: pip install 'caption-pipeline[ray]'"
EXIT_FATAL = 3


class RayEngine:
    name = "ray"

    def __init__(self, actors: int | None = None) -> None:
        self.requested_actors = actors
        self.report: dict[str, Any] = {}  # what the run report adds: the actors used
        self.written = KeySet()  # keys kept by this run: one row per key, whatever Ray retried

    async def run(self, session: RunSession) -> None:
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError:
            raise RunFatal(MISSING_RAY, "config", exit_code=2) from None
        s = session.settings
        # Paths as every node sees them: actors do not share the driver's working directory.
        remote = replace(s, manifest=s.manifest.resolve(), out=s.out.resolve())
        started = await asyncio.to_thread(_connect, s.ray_address)
        try:
            with _quiet_ray_data(), _data_context(), warnings.catch_warnings():
                # A chunk is one block, so a short run has fewer inputs than actors.
                warnings.filterwarnings("ignore", "The minimum number of concurrent actors")
                try:
                    done = session.opened.resume.done.sorted_array()
                    ds = await asyncio.to_thread(self._dataset, remote, done,
                                                 session.opened.schema.names)
                except Exception as e:  # e.g. a Ray Data API this version lacks: one line
                    raise _unwrap(e) from None
                await self._consume(session, ds)
        finally:
            if started:
                import ray

                await asyncio.to_thread(ray.shutdown)

    def _dataset(self, s: Settings, done: Any, columns: list[str]) -> Any:
        import ray
        from ray.data import ActorPoolStrategy

        from ..records import BASE_NAMES

        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = self.requested_actors or s.ray_actors or max(1, cpus // CPUS_PER_ACTOR)
        n = max(1, min(n, s.concurrency))
        self.report = {"ray_actors": n}
        per = max(1, s.concurrency // n)
        def split(v: float | None) -> float | None:
            return None if v is None else v / n

        extras = tuple(c for c in columns if c not in BASE_NAMES)
        share = Share(per, split(s.rpm), split(s.tpm), split(s.itpm), split(s.otpm),
                      split(s.max_cost), IMAGE_THREADS, extras)
        chunk_rows = max(4, min(256, per))
        log.debug("ray: %d actors x %d requests in flight, chunks of %d rows", n, per,
                  chunk_rows)
        # The planning task reads the manifest where the driver does: on this node.
        pin = f"node:{ray.util.get_node_ip_address()}"
        place = {"resources": {pin: 0.001}} if pin in ray.cluster_resources() else {}
        ds = ray.data.from_items([{"shard": 0}]).map_batches(
            plan_chunks, batch_size=1, batch_format="pyarrow", num_cpus=0,
            fn_kwargs={"manifest": str(s.manifest), "fmt": s.manifest_format,
                       "prompts": s.named_prompts, "limit": s.limit,
                       "done": [ray.put(done)], "chunk_rows": chunk_rows},
            **place)
        pool, remote = _actor_pool(ActorPoolStrategy, n)
        return ds.map_batches(
            CaptionActor, compute=pool, batch_size=1, batch_format="pyarrow",
            num_cpus=CPUS_PER_ACTOR,
            # The key travels on its own, to the one place that sends it (the actor's
            # transport); the settings every actor holds carry none.
            fn_constructor_kwargs={"settings": replace(s, api_key=Secret("")),
                                   "share": share, "key": s.api_key},
            **remote)

    async def _consume(self, session: RunSession, ds: Any) -> None:
        loop = asyncio.get_running_loop()
        batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
        drain_until: float | None = None  # the budget was reached: drain, then stop
        try:
            while True:
                if session.halting and (session.stop is not Stop.BUDGET or (
                        drain_until is not None and loop.time() > drain_until)):
                    break
                batch = await _next_batch(loop, batches, session)
                if batch is None:
                    break
                for kind, payload, info in zip(*(batch.column(c).to_pylist()
                                                 for c in ("kind", "payload", "info"))):
                    self._on_chunk(session, kind, payload, info)
                if session.stop is Stop.BUDGET and drain_until is None:
                    drain_until = loop.time() + session.settings.grace
        except RunFatal:
            raise
        except Exception as e:  # Ray's errors wrap ours; one line, exit 3
            session.halt(Stop.FATAL, _unwrap(e))
        finally:
            with contextlib.suppress(Exception):
                batches.close()  # stops the actors

    def _on_chunk(self, session: RunSession, kind: str, payload: bytes | None,
                  info: str | None) -> None:
        if kind == "stats":
            counts = json.loads(payload or b"{}")
            plan = session.counters.plan
            plan.skipped_done = counts["skipped_done"]
            plan.skipped_duplicate = counts["skipped_duplicate"]
            plan.pending = counts["pending"]
            for line, rid in counts["duplicates"]:
                log.warning("manifest line %d: duplicate id %r skipped (first one kept)",
                            line, rid)
            if counts["skipped_duplicate"] > len(counts["duplicates"]):
                log.warning("... and %d more duplicate ids skipped",
                            counts["skipped_duplicate"] - len(counts["duplicates"]))
            session.progress.set_total(counts["pending"])
        if kind == "rows" and payload:
            for row in decode_rows(payload):
                h = key_hash(row.id, row.prompt_name)
                if h in self.written:
                    continue  # a chunk Ray ran twice: the first row of a key wins
                self.written.add(h)
                session.keep(row)
        if info:
            halt = json.loads(info)
            if "fatal" in halt:
                session.halt(Stop.FATAL, RunFatal(halt["fatal"], halt.get("error_class"),
                                                  exit_code=halt.get("exit_code", EXIT_FATAL)))
            elif "budget" in halt:
                session.halt(Stop.BUDGET, note=halt["budget"])


async def _next_batch(loop: asyncio.AbstractEventLoop, batches: Iterator[Any],
                      session: RunSession) -> Any:
    """The next batch, read in a daemon thread (Ray's wait cannot be interrupted, and a
    thread stuck in it must not keep the process alive); None at the end or on a stop
    that does not wait (a signal, a failed write, a fatal error)."""
    fut: asyncio.Future[Any] = loop.create_future()

    def read() -> None:
        try:
            value = next(batches, None)
        except BaseException as e:  # noqa: BLE001 - handed to the loop
            loop.call_soon_threadsafe(_settle, fut, None, e)
            return
        loop.call_soon_threadsafe(_settle, fut, value, None)

    threading.Thread(target=read, daemon=True, name="ray-batches").start()
    stop = asyncio.ensure_future(session.stopped.wait())
    try:
        await asyncio.wait({fut, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if fut.done():
        return fut.result()
    if session.stop is Stop.BUDGET:  # the budget drains: wait for what is in flight
        return await fut
    return None


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


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
