"""The local engine: the session's pending rows → a bounded queue → a fixed pool of workers.

* The queue holds at most 2 × concurrency rows, so memory stays flat; a row's image is
  prepared as it enters the queue, once for all of its prompts.
* A stop with grace (a signal, a failed write, the budget) cancels the workers that
  are not inside a request at once and gives the others ``--grace`` seconds; a fatal
  stop, or a second signal, cancels everything now. Rows left in the queue stay
  pending (their image preparation is cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from typing import Any

from ..errors import RunFatal
from ..images.load import default_executor
from ..pacing.cost import BudgetReached
from ..pacing.limiter import Budgets
from ..records import ManifestRow, PreparedImage, ResultRow
from ..run.session import RunSession, Stop
from ..run.stack import build_worker
from ..run.stopping import Interrupted

__all__ = ["LocalEngine"]

log = logging.getLogger("pipeline")

_DONE = None  # queue sentinel
# A unit of work: one row, or (chained prompts) one image's rows, run in turn.
Item = tuple[tuple[ManifestRow, ...], "asyncio.Future[PreparedImage] | None"]


class LocalEngine:
    name = "local"

    async def run(self, session: RunSession) -> None:
        s = session.settings
        self.session = session
        self.queue: asyncio.Queue[Item | None] = asyncio.Queue(2 * s.concurrency)
        images = session.opened.resume.images
        index = await session.dedupe_index()
        gate = await session.quality_gate()
        self.chain = await session.chain()
        async with contextlib.AsyncExitStack() as stack:
            self.worker = await build_worker(
                stack, s, concurrency=s.concurrency,
                budgets=Budgets(s.rpm, s.tpm, s.itpm, s.otpm), max_cost=s.max_cost,
                executor=default_executor(),
                lookup_done=index.lookup if index is not None else None,
                should_stop=lambda: session.halting,
                image_refs=None if s.allow_mixed or not len(images) else images, gate=gate)
            session.progress.waiting = self.worker.limiter.describe_wait  # long waits shown
            self.workers = [asyncio.create_task(self._work()) for _ in range(s.concurrency)]
            producer = asyncio.create_task(self._produce())
            try:
                await self._wait(producer)
            finally:
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
                self._drop_queued()

    async def _wait(self, producer: asyncio.Task[None]) -> None:
        session = self.session
        workers = asyncio.gather(*self.workers)
        stop = asyncio.create_task(session.stopped.wait())
        waiting: set[asyncio.Future[Any]] = {workers, stop, producer}
        while not (workers.done() or stop.done()):
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if producer in done and not producer.cancelled() and producer.exception():
                exc = producer.exception()
                # A plan that must stop (a conflicting id), or a manifest that could not
                # be read on: no row is lost, stop cleanly.
                session.halt(Stop.FATAL, exc if isinstance(exc, RunFatal) else RunFatal(
                    f"manifest {session.settings.manifest}: reading stopped: {exc}",
                    "manifest", exit_code=2))
        if not workers.done():
            producer.cancel()
            if session.stop is not None and session.stop.with_grace:
                for t in self.workers:  # rows mid-request get the grace, the others go
                    if not self.worker.sending(t):
                        t.cancel()
                # A budget stop lets the requests it reserved cost for finish (each is one
                # attempt, bounded by --attempt-timeout); the other stops give the grace.
                grace = None if session.stop is Stop.BUDGET else session.settings.grace
                cancel: asyncio.Future[Any] = asyncio.create_task(session.cancel_now.wait())
                # Not ``workers``: a cancelled worker ends that gather at once, which cut
                # the grace of the rows still in flight to nothing.
                graced = asyncio.gather(*self.workers, return_exceptions=True)
                await asyncio.wait([graced, cancel], timeout=grace,
                                   return_when=asyncio.FIRST_COMPLETED)
                cancel.cancel()
            for t in self.workers:
                t.cancel()
        stop.cancel()
        await asyncio.gather(workers, stop, return_exceptions=True)

    async def _produce(self) -> None:
        session = self.session
        async for group in session.plan.groups():  # a stream is read off the loop
            if not group:
                await asyncio.sleep(0)  # a long run of done rows must not starve the loop
                continue
            # Start preparing the image now, once for all of the row's prompts, so it is
            # ready when a worker takes the row (the queue bounds how many are ahead).
            first = group[0]
            prepared = None if first.error else self.worker.prepare(first)
            if self.chain is not None:  # upstream rows first, in one worker's turn
                await self.queue.put((tuple(group), prepared))
                continue
            for row in group:
                await self.queue.put(((row,), prepared))
        session.progress.set_total(session.plan.pending)
        for _ in self.workers:
            await self.queue.put(_DONE)

    def _drop_queued(self) -> None:
        """Rows still queued at a stop stay pending; cancel their image preparation."""
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not None and item[1] is not None:
                item[1].cancel()

    async def _work(self) -> None:
        session = self.session
        while not session.halting:
            await session.room()
            item = await self.queue.get()
            if item is None:
                return
            rows, prepared = item
            earlier: dict[str, ResultRow] = {}  # this image's finished rows (chains)
            for row in rows:
                try:
                    result = await self._one(row, prepared, earlier)
                except Interrupted:
                    return  # the row (and the rest of its unit) stays pending
                except BudgetReached as e:  # what is in flight finishes; this row waits
                    session.halt(Stop.BUDGET, note=str(e))
                    return
                except RunFatal as e:
                    session.halt(Stop.FATAL, e)
                    return
                earlier[row.prompt_name] = result
                session.keep(result)
                if session.halting:
                    return

    async def _one(self, row: ManifestRow, prepared: asyncio.Future[PreparedImage] | None,
                   earlier: dict[str, ResultRow]) -> ResultRow:
        if self.chain is None:
            return await self.worker.process(row, prepared)
        filled, failed, upstream = await self.chain.fill(row, earlier)
        if failed is not None:
            return failed
        assert filled is not None
        result = await self.worker.process(filled, prepared)
        return replace(result, upstream=upstream) if upstream else result
