"""The batch lane: the session's pending rows → provider batches → the same result rows.

One run is one cron-shaped pass: every open ledger entry is moved on as far as it goes
without waiting (upload, create, poll, collect), then what is pending is built into
request files and submitted, and the run ends with one line saying what is in flight.
``--wait`` polls (every ``--poll-interval`` seconds) until every batch has ended, and
resubmits requests that ended transiently (expired, canceled, server errors) up to
``--retries`` rounds. Every step is recorded in the ledger before its side effect
(``batch.ledger``), so a kill at any point submits nothing twice: a request file
already uploaded is found by name, a batch already created by its metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from typing import Any

from ..batch.build import Builder
from ..batch.collect import collect, manifest_row
from ..batch.files import split_file
from ..batch.ledger import Entry, Ledger, in_flight_keys
from ..batch.providers import BatchApi, Remote, TooLarge, get_api
from ..errors import Retryable, RowFailed, output_error
from ..images.load import default_executor
from ..keys import KeySet
from ..logs import Say
from ..pacing.cost import CostBudget
from ..pacing.limiter import Budgets
from ..quality import Gate
from ..records import ResultRow, error_row
from ..run.reask import judged_without_reask
from ..run.session import RunSession, Stop
from ..run.stack import build_worker
from ..sources.choose import open_source
from ..sources.plan import Plan

__all__ = ["BatchEngine"]

log = logging.getLogger("pipeline")


class BatchEngine:
    name = "batch"

    def __init__(self) -> None:
        self.report: dict[str, Any] = {"lane": "batch"}
        self.replaced_errors = False  # a collected row may replace an earlier error row
        self.submitted = Counter[str]()
        self.fresh: set[str] = set()  # entries sealed by this run: nothing to adopt
        self.gate: Gate | None = None  # the quality gate: flags only in this lane

    async def run(self, session: RunSession) -> None:
        s = session.settings
        self.session, self.s = session, s
        self.ledger = Ledger(s.out / "_batches")
        self.done: KeySet = session.plan.done
        self.retry = KeySet()
        self.gate = await session.quality_gate()
        async with contextlib.AsyncExitStack() as stack:
            worker = await build_worker(
                stack, s, concurrency=min(s.concurrency, 64),
                budgets=Budgets(None, None, None, None), max_cost=None,
                executor=default_executor(), lookup_done=None,
                should_stop=lambda: session.halting)
            self.adapter, self.policy = worker.adapter, worker.policy
            self.api: BatchApi = get_api(s.api, worker.transport, worker.policy,  # type: ignore[arg-type]
                                         s.response_cap + 64 * 1024)
            price = s.price
            self.builder = Builder(s, self.ledger, self.api, self.adapter, worker.prepare,
                                   session.run_id, self._keep, await session.dedupe_index(),
                                   CostBudget(price, s.max_cost) if price else None)
            self.ledger.remove_orphans()  # files of a request file a kill left unsealed
            cycle = asyncio.ensure_future(self._cycle())
            now = asyncio.ensure_future(session.cancel_now.wait())
            try:
                # A second signal (or a fatal stop) ends the step in hand: every step is
                # safe to cut (the ledger says what to look for next time).
                await asyncio.wait([cycle, now], return_when=asyncio.FIRST_COMPLETED)
                if not cycle.done():
                    cycle.cancel()
                await asyncio.gather(cycle, return_exceptions=True)
                if not cycle.cancelled() and cycle.exception() is not None:
                    raise cycle.exception()  # type: ignore[misc]
            finally:
                now.cancel()
                self._report()

    # ---------------------------------------------------------------- the pass

    async def _cycle(self) -> None:
        session, s = self.session, self.s
        self.rounds = 0
        await self._advance(self.ledger.open_entries())
        while not session.halting:
            rounds = self.rounds
            first = rounds == 0
            retry, self.retry = self.retry, KeySet()
            if first or (len(retry) and rounds <= s.retries and self._can_replan()):
                plan = session.plan if first else self._replan()
                only = retry if not first and s.limit is not None else None
                try:
                    built = await self.builder.build(
                        plan.groups(), self._submit, lambda: session.halting, only,
                        skip=in_flight_keys(self.ledger))
                finally:
                    if plan is not session.plan:
                        plan.manifest.close()
                if built.budget_note:
                    session.halt(Stop.BUDGET, note=built.budget_note)
                self.rounds += 1
            entries = self.ledger.open_entries()
            if not s.wait or session.halting:
                break
            if not entries:  # a batch may have ended (and left requests to resend) at once
                if len(self.retry) and self.rounds <= s.retries and self._can_replan():
                    continue
                break
            await self._pause(entries)
            await self._advance(self.ledger.open_entries())
        self._say(self.ledger.open_entries())

    def _can_replan(self) -> bool:
        return not getattr(self.session.plan.manifest, "one_shot", False)

    def _replan(self) -> Plan:
        s = self.s
        source = open_source(s.manifest, s.manifest_format, s.max_file_bytes)
        return Plan(source, self.done, s.named_prompts, None, out=s.out)

    async def _pause(self, entries: list[Entry]) -> None:
        states = Counter(e.status or e.state for e in entries)
        Say(self.s.log_format == "json")(
            "batch", f"waiting for {len(entries)} batches "
            f"({', '.join(f'{k} {n}' for k, n in sorted(states.items()))}); next check in "
            f"{self.s.poll_interval:g} s", level="info")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.session.stopped.wait(), self.s.poll_interval)

    def _say(self, entries: list[Entry]) -> None:
        say = Say(self.s.log_format == "json")
        if not entries:
            say("batch", "nothing in flight", level="info")
            return
        states = Counter(e.status or e.state for e in entries)
        requests = sum(e.requests for e in entries)
        say("batch", f"{len(entries)} batches in flight ({requests} requests: "
                     f"{', '.join(f'{k} {n}' for k, n in sorted(states.items()))}); run "
                     "the same command again to collect them (or pass --wait)", level="info")

    def _report(self) -> None:
        self.report.update(
            batches_submitted=self.submitted["batches"],
            requests_submitted=self.submitted["requests"],
            batches_collected=self.submitted["collected"],
            rows_collected=self.submitted["rows"],
            in_flight=[{"entry": e.lid, "batch_id": e.batch_id, "state": e.state,
                        "status": e.status, "requests": e.requests}
                       for e in self.ledger.open_entries()])

    def _keep(self, row: ResultRow) -> None:
        if self.gate is not None:  # checked and flagged; never re-asked in this lane
            row = judged_without_reask(self.gate, row)
        self.session.keep(row)

    # ---------------------------------------------------------------- one entry

    async def _submit(self, entry: Entry) -> None:
        """A file just sealed: upload it and create its batch (no waiting)."""
        self.fresh.add(entry.lid)
        await self._advance([entry])

    async def _advance(self, entries: list[Entry]) -> None:
        todo = list(entries)
        while todo and not self.session.halting:
            entry = todo.pop(0)
            try:
                todo.extend(await self._step(entry))
            except (Retryable, RowFailed) as e:
                log.warning("batch %s (%s): %s; the next run tries again", entry.lid,
                            entry.state, e.message)
            except OSError as e:  # the ledger or a request file could not be written
                raise output_error(e, self.ledger.dir) from None

    async def _step(self, e: Entry) -> list[Entry]:
        """Move one entry on as far as it goes now; returns new entries (split halves)."""
        api, ledger = self.api, self.ledger
        path = ledger.requests_path(e.lid)
        if e.state == "built":
            if api.wrap_lines:  # Anthropic: no upload, the lines go in the create body
                e.state = "uploaded"
            else:
                fid = None if e.lid in self.fresh else await api.find_file(e)
                if fid is None:
                    try:
                        fid = await api.upload(e, path)
                    except TooLarge:
                        return await self._split(e)
                e.file_id, e.state = fid, "uploaded"
            ledger.save(e)
        if e.state in ("uploaded", "creating"):
            look = e.state == "creating"  # a run died while creating: it may exist
            if not look:
                e.state, e.creating_at = "creating", time.time()
                ledger.save(e)  # before the create: a rerun looks before it creates
            try:
                remote = await self._create(e, look)
            except TooLarge:
                return await self._split(e)
            e.batch_id, e.state = remote.id, "created"
            self._update(e, remote)
            ledger.save(e)
            self.submitted["batches"] += 1
            self.submitted["requests"] += e.requests
        if e.state == "created":
            assert e.batch_id is not None
            self._update(e, await api.get(e.batch_id))
            ledger.save(e)
        if e.state == "ended":
            await self._collect(e)
        return []

    async def _create(self, e: Entry, look: bool) -> Remote:
        known = {x.batch_id for x in self.ledger.entries() if x.batch_id}
        if look and (found := await self.api.find_batch(e, known)) is not None:
            log.info("batch %s: adopted %s, created before the last run stopped", e.lid,
                     found.id)
            return found
        attempts = 0
        while True:
            attempts += 1
            try:
                return await self.api.create(e, self.ledger.requests_path(e.lid))
            except Retryable as err:
                # The create may have happened and only its answer been lost: look first.
                if (found := await self.api.find_batch(e, known)) is not None:
                    return found
                if not self.policy.may_retry(attempts):
                    raise
                await asyncio.sleep(self.policy.next_delay(attempts, err.retry_after))

    def _update(self, e: Entry, r: Remote) -> None:
        e.status, e.counts = r.status, r.counts
        e.output_file_id = r.output_file_id or e.output_file_id
        e.error_file_id = r.error_file_id or e.error_file_id
        e.results_url = r.results_url or e.results_url
        if r.ended and r.failed:
            e.state, e.note = "failed", r.note or "the provider refused the batch"
            log.warning("batch %s (%s) failed: %s; its rows are pending again", e.lid,
                        e.batch_id, e.note)
            self.ledger.discard_files(e)
        elif r.ended:
            e.state = "ended"

    async def _collect(self, e: Entry) -> None:
        session = self.session
        s = self.s
        # A request that ended transiently is sent again by this run when a build is
        # still to come (the first, or a --wait round): it stays pending, unwritten.
        resend = self.rounds == 0 or (s.wait and self.rounds <= s.retries
                                      and self._can_replan())
        got = await collect(e, self.api.results(e), self.ledger.rows_path(e.lid),
                            self.adapter, s.price, self.done, self._keep, session.room,
                            stop=lambda: session.stop is Stop.FATAL or session.cancel_now.is_set(),
                            hold_transient=resend)
        if got.interrupted:
            return  # the next run collects again and skips what was kept
        await asyncio.to_thread(session.sink.sync)  # the rows are durable before "collected"
        e.state, e.collected = "collected", got.rows
        self.ledger.save(e)
        self.ledger.discard_files(e)
        self.replaced_errors = True
        self.submitted["collected"] += 1
        self.submitted["rows"] += got.rows
        self.retry.add_many(got.transient_keys())

    async def _split(self, e: Entry) -> list[Entry]:
        """The provider refused the file as too large: two halves replace it."""
        ledger = self.ledger
        if e.requests <= 1:  # nothing left to split: its rows fail, readably
            for record in _records(ledger.rows_path(e.lid)):
                self._keep(error_row(manifest_row(record), f"the provider refused the "
                                     f"request as too large ({e.bytes} bytes)", "too_large",
                                     lane="batch", **record.get("columns", {})))
            e.state, e.note = "failed", "too large, even alone"
            ledger.save(e)
            ledger.discard_files(e)
            return []
        halves = [self.builder._open(), self.builder._open()]
        await asyncio.to_thread(split_file, ledger.requests_path(e.lid),
                                ledger.rows_path(e.lid), e.lid, halves)
        out = []
        for h in halves:
            sha = await asyncio.to_thread(h.seal)
            half = Entry(h.lid, e.api, e.model, self.session.run_id, sha256=sha,
                         requests=h.requests, rows=h.rows, bytes=h.bytes,
                         est_cost_usd=round(e.est_cost_usd / 2, 6), parent=e.lid,
                         endpoint=e.endpoint)
            ledger.save(half)
            self.fresh.add(half.lid)
            out.append(half)
        e.state, e.note = "split", f"too large: split into {out[0].lid} and {out[1].lid}"
        ledger.save(e)
        ledger.discard_files(e)
        log.info("batch %s: refused as too large (%d bytes); split in two", e.lid, e.bytes)
        return out


def _records(path: Any) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f]
