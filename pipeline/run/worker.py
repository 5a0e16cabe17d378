"""One manifest row end to end: image → request → stream → fold → result row, with retries.

``process`` never raises for a row's problem: every outcome is a result row. Only a
``RunFatal`` (bad key, unknown model, exhausted quota) propagates, because every other
row would fail the same way. Text from a failed attempt is discarded: a caption comes
from exactly one complete attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import PipelineError, Retryable, RowFailed, RunFatal, classify_http
from ..images.dedupe import Dedupe, dedup_key
from ..images.load import ImageSource
from ..keys import ImageRefs
from ..pacing.cost import BudgetReached, CostBudget, Price
from ..pacing.limiter import Limiter, Outcome, Permit
from ..pacing.retry import RetryPolicy
from ..quality import Gate
from ..records import (
    ApiRequest,
    Completion,
    ManifestRow,
    PreparedImage,
    ResultRow,
    Usage,
    copied_row,
    error_row,
    ok_row,
    prompt_sha256,
)
from ..settings import Settings
from ..sources.plan import variants
from ..wire.adapters.base import Adapter, normalize_finish
from ..wire.adapters.openai_chat import with_service_tier
from ..wire.channel import Channel, Head
from ..wire.endpoint import EndpointWatch
from ..wire.response import ResponseReader, structured_columns
from .reask import Reasker
from .stopping import Interrupted

__all__ = ["Interrupted", "Worker"]

log = logging.getLogger("pipeline")

# A reasoning_exhausted answer is sent once more with this many times max_tokens.
REASONING_RETRY_FACTOR = 4
# How a retryable failure feeds the limiter: "slow down" versus "server busy". Both are
# the rate limit: they never use up --retries (bounded by --max-rate-wait instead).
_OUTCOME = {"rate_limit": Outcome.THROTTLED, "overloaded": Outcome.OVERLOADED}


@dataclass
class _Tries:
    """One row's attempts so far, to decide on the next, and where the last one ran
    (errors are never changed after they are raised: this is the row's record)."""

    sent: int = 0          # attempts sent (the ``attempts`` column)
    failures: int = 0      # failures that count against --retries
    refusals: int = 0      # 429/529 refusals: bounded by --max-rate-wait instead
    rate_waited: float = 0.0  # seconds from those refusals to the next attempts
    refused_at: float | None = None
    waited: float | None = None  # the last server-directed wait (``retry_after_s``)
    sent_at: float | None = None     # when the last attempt was let through the limiter
    latency: float | None = None     # of the last attempt, once it was sent
    request_id: str | None = None    # of the last attempt's response head
    tier: str | None = None          # the service tier the next attempt asks for
    capacity: int = 0                # flex capacity refusals (docs/protocol.md §18)


class Worker:
    def __init__(self, settings: Settings, adapter: Adapter, transport: Channel,
                 images: ImageSource, limiter: Limiter, policy: RetryPolicy,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 should_stop: Callable[[], bool] = lambda: False,
                 dedupe: Dedupe | None = None, budget: CostBudget | None = None,
                 image_refs: ImageRefs | None = None,
                 endpoint: EndpointWatch | None = None, gate: Gate | None = None) -> None:
        self.settings = settings
        self.adapter = adapter
        self.transport = transport
        self.images = images
        self.limiter = limiter
        self.policy = policy
        self.clock = clock
        self.sleep = sleep
        self.should_stop = should_stop
        self.dedupe = dedupe
        self.budget = budget
        self.image_refs = image_refs  # what OUT holds per id: another image is a conflict
        # Fail fast on a wrong URL (pipeline/endpoint.py); a fresh watch for a worker
        # built without one (tests) still applies the rule.
        self.endpoint = endpoint or EndpointWatch(settings.endpoint,
                                                  adapter.path.replace("{model}", settings.model),
                                                  settings.key_source)
        self.reasker = None if gate is None else Reasker(
            gate, adapter, settings.request_spec, budget, should_stop)
        self.in_request: set[asyncio.Task[Any] | None] = set()  # tasks with a request open
        self.reader = ResponseReader(adapter, settings.options.n, settings.line_cap,
                                     settings.response_cap, clock)

    def prepare(self, row: ManifestRow) -> asyncio.Future[PreparedImage]:
        """Start preparing ``row``'s image now (for all of its prompts); ``process``
        takes the future, so the image is ready when a worker takes the row."""
        future = asyncio.ensure_future(self.images.load(row))
        # A row may end without its image (a chained prompt whose upstream failed, a
        # stop): its failure is then nobody's, so mark it seen (asyncio would log a
        # traceback). A row that awaits the future still gets the error.
        future.add_done_callback(_seen)
        return future

    def sending(self, task: asyncio.Task[Any]) -> bool:
        """True while ``task`` has a request open: a stop gives it the grace."""
        return task in self.in_request

    async def process(self, row: ManifestRow,
                      prepared: Awaitable[PreparedImage] | None = None) -> ResultRow:
        """The result row for ``row``; ``prepared`` is its image if already under way."""
        if row.error:
            return error_row(row, row.error, "bad_input")
        if row.prompt is None:  # a row from outside the planner: prompted the planner's way
            row = next(variants(row, self.settings.named_prompts[:1]))
        prompt = row.prompt or ""
        try:
            # Shielded: the same preparation serves every prompt of the row.
            image = await (asyncio.shield(prepared) if prepared is not None
                           else self.images.load(row))
        except RowFailed as e:
            return error_row(row, e.message, e.error_class)
        except Exception as e:  # a bug or an unforeseen input: one row, never the batch
            log.exception("row %s: image stage failed unexpectedly", row.id)
            return error_row(row, f"internal error preparing the image: "
                                  f"{type(e).__name__}: {e}", "internal")
        if self.image_refs is not None and image.sha256 is not None \
                and self.image_refs.sha_conflict(row.id, image.sha256):
            raise RunFatal(f"manifest line {row.line}: id {row.id!r} is in "
                           f"{self.settings.out} for an image with other content than "
                           f"{row.image!r} now has (replaced file?). Caption into a new "
                           "--out, give the row a new id, or pass --allow-mixed", "config",
                           exit_code=2)
        columns = image.columns()
        columns["prompt_sha256"] = prompt_sha256(self.settings.system, prompt)
        key = None
        if image.sha256 is not None and self.dedupe is not None:
            s = self.settings
            key = dedup_key(image.sha256, prompt, s.system, s.model)
            columns["dedup_key"] = key
            original = await self.dedupe.claim(key)
            if original is not None:
                return copied_row(row, original, **columns)
        result = None
        try:
            try:
                req = self.adapter.build_request(row, image, self.settings.request_spec)
                result = await self._with_retries(row, req, self._thinking_room(row, image))
                if result.ok and self.reasker is not None:  # the quality gate, one re-ask
                    result = await self.reasker.judged(
                        row, image, result, lambda again: self._with_retries(row, again))
            except (RunFatal, Interrupted, BudgetReached):
                raise
            except Exception as e:  # a bug or an unforeseen input: one row, not the batch
                log.exception("row %s: failed unexpectedly", row.id)
                result = error_row(row, f"internal error: {type(e).__name__}: {e}",
                                   "internal")
            result = replace(result, **columns)
            return result
        finally:
            if key is not None and self.dedupe is not None:
                self.dedupe.resolve(key, result)

    def _thinking_room(self, row: ManifestRow, image: PreparedImage
                       ) -> Callable[[], ApiRequest | None]:
        """The one retry of a ``reasoning_exhausted`` answer: the same request with
        ``REASONING_RETRY_FACTOR`` × ``max_tokens``, if the cost budget can still hold
        it (else None: the row is an error row, the run goes on)."""
        def bigger() -> ApiRequest | None:
            spec = self.settings.request_spec
            spec = replace(spec, max_tokens=spec.max_tokens * REASONING_RETRY_FACTOR)
            req = self.adapter.build_request(row, image, spec)
            if self.budget is not None and not self.budget.affords(req.est_input_tokens,
                                                                   req.est_output_tokens):
                return None
            return req
        return bigger

    async def _with_retries(self, row: ManifestRow, req: ApiRequest,
                            more_room: Callable[[], ApiRequest | None] | None = None
                            ) -> ResultRow:
        """Attempts until one succeeds, the retries run out, or the row has waited
        ``--max-rate-wait`` in total for the rate limit (429/529 never use up retries)."""
        tries = _Tries(tier=self.settings.options.service_tier)
        while True:
            tries.sent += 1
            tries.sent_at = tries.latency = tries.request_id = None
            try:
                result = await self._attempt_row(row, req, tries)
                self.endpoint.success()
                return result
            except RunFatal as e:
                raise self.endpoint.fatal(e) from None  # with the URL, or the key's source
            except Retryable as e:
                if self.endpoint.probing(e):  # the endpoint may be wrong: no error row yet
                    await self.sleep(self.policy.next_delay(tries.sent))
                    continue
                delay, why = self._next_wait(e, tries)
                if delay is None:
                    return self._failed(row, e, tries, suffix=why)
                req = self._fallback(row, req, e, tries)
                if self.should_stop():
                    raise Interrupted from e
                log.debug("row %s: attempt %d failed (%s: %s); retrying in %.2f s", row.id,
                          tries.sent, e.error_class, e.message, delay)
                await self.sleep(delay)
            except RowFailed as e:
                if self.endpoint.probing(e):
                    await self.sleep(self.policy.next_delay(tries.sent))
                    continue
                if e.error_class == "reasoning_exhausted" and more_room is not None:
                    bigger, more_room = more_room(), None  # once per row
                    if bigger is not None:
                        log.debug("row %s: the model reasoned until max_tokens; once more "
                                  "with max_tokens %d", row.id, bigger.est_output_tokens)
                        req = bigger
                        continue
                return self._failed(row, e, tries)

    def _fallback(self, row: ManifestRow, req: ApiRequest, e: Retryable, t: _Tries
                  ) -> ApiRequest:
        """A flex row refused for capacity ``--flex-fallback-after`` times goes on the
        standard tier (at the standard price: the cost budget checks it as such)."""
        if e.error_class != "capacity" or t.tier != "flex":
            return req
        t.capacity += 1
        if t.capacity < self.settings.flex_fallback_after:
            return req
        log.debug("row %s: flex tier refused %d times for capacity; next on the standard "
                  "tier", row.id, t.capacity)
        t.tier = "default"
        return with_service_tier(req, "default")

    def _next_wait(self, e: Retryable, t: _Tries) -> tuple[float | None, str]:
        """Seconds until the row's next attempt, or None and why it gives up."""
        if t.refused_at is not None and t.sent_at is not None:
            t.rate_waited += max(0.0, t.sent_at - t.refused_at)
        t.refused_at = None
        guided = self.policy.server_wait(e.retry_after) is not None
        if e.error_class in _OUTCOME:
            t.refusals += 1
            delay = self.policy.rate_delay(t.refusals, e.retry_after)
            bound = self.policy.max_rate_wait
            if t.rate_waited + delay > bound:
                return None, (f" (gave up after {t.refusals} refusals and {t.rate_waited:.0f} s "
                              f"waiting for the rate limit; --max-rate-wait {bound:g})")
            t.refused_at = self.clock()
            if e.error_class == "rate_limit":  # a 429 slows the whole pool
                pool = self.policy.pool_delay(self.limiter.pause_step(guided),
                                               e.retry_after)
                self.limiter.refused(pool, guided)
        else:
            t.failures += 1
            if not self.policy.may_retry(t.failures):
                return None, f" (gave up after {t.sent} attempts)"
            delay = self.policy.next_delay(t.failures, e.retry_after)
        if guided:
            t.waited = delay
        return delay, ""

    async def _attempt_row(self, row: ManifestRow, req: ApiRequest, tries: _Tries
                           ) -> ResultRow:
        """One attempt under the limiter and the cost budget: the ok row, or it raises.

        Cost is reserved only once the rate permit is granted: a row waiting for the
        limiter holds no reservation, so a budget stop never has to cancel a row that
        the budget already paid for."""
        price = self.settings.tier_price(tries.tier) if tries.tier else None
        if self.budget is not None:
            self.budget.check(req.est_input_tokens, req.est_output_tokens, price)
        permit = await self.limiter.acquire(req.est_input_tokens, req.est_output_tokens)
        if self.should_stop():  # the run stopped while this row waited: send nothing
            self.limiter.cancel(permit)
            raise Interrupted
        try:  # BudgetReached propagates: the run stops taking rows
            reserved = self.budget.reserve(req.est_input_tokens, req.est_output_tokens,
                                           price) if self.budget else 0.0
        except BaseException:
            self.limiter.cancel(permit)
            raise
        start = tries.sent_at = self.clock()
        outcome, usage, retry_after = Outcome.ERROR, None, None
        try:
            completion, head, ttft = await self._attempt(req, start, permit, tries)
            usage = completion.usage
            if completion.service_tier and tries.tier:  # priced at the tier it was served
                price = self.settings.tier_price(completion.service_tier)
            structured = structured_columns(completion.text, self.settings.options)
            outcome = Outcome.OK
        except PipelineError as e:
            usage, outcome = e.usage, _OUTCOME.get(e.error_class, Outcome.ERROR)
            retry_after = e.retry_after
            raise
        finally:
            tries.latency = self.clock() - start
            cost = self._settle(reserved, usage, price)
            self.limiter.finish(permit, outcome, usage.prompt_tokens if usage else None,
                                usage.completion_tokens if usage else None, retry_after)
        return ok_row(row, completion, attempts=tries.sent, latency_s=tries.latency,
                      ttft_s=ttft, request_id=head.request_id, http_status=head.status,
                      retry_after_s=tries.waited, cost_usd=cost, **structured)

    def _settle(self, reserved: float, usage: Usage | None, price: Price | None = None
                ) -> float | None:
        if self.budget is None:
            return None
        tokens_in = usage.prompt_tokens if usage else None
        tokens_out = usage.completion_tokens if usage else None
        return self.budget.settle(reserved, tokens_in, tokens_out, price)

    def _failed(self, row: ManifestRow, e: PipelineError, tries: _Tries, suffix: str = ""
                ) -> ResultRow:
        log.debug("row %s: failed after %d attempt(s) (%s): %s%s", row.id, tries.sent,
                  e.error_class, e.message, suffix)
        columns: dict[str, Any] = {}
        if e.finish_reason_raw:
            columns.update(finish_reason=normalize_finish(e.finish_reason_raw),
                           finish_reason_raw=e.finish_reason_raw)
        if e.error_class == "invalid_json":
            columns["json_valid"] = False
        if e.usage is not None:  # tokens were spent even though the row failed
            columns.update(prompt_tokens=e.usage.prompt_tokens,
                           completion_tokens=e.usage.completion_tokens,
                           total_tokens=e.usage.total_tokens,
                           reasoning_tokens=e.usage.reasoning_tokens, usage_source="reported")
            if self.budget is not None:
                columns["cost_usd"] = self.budget.price.cost(e.usage.prompt_tokens,
                                                             e.usage.completion_tokens)
        return error_row(row, e.message + suffix, e.error_class, attempts=tries.sent,
                         latency_s=tries.latency if tries.latency is not None else 0.0,
                         http_status=e.http_status, retry_after_s=tries.waited,
                         request_id=tries.request_id, **columns)

    async def _attempt(self, req: ApiRequest, start: float, permit: Permit, tries: _Tries
                       ) -> tuple[Completion, Head, float | None]:
        task = asyncio.current_task()
        self.in_request.add(task)
        try:
            return await self._exchange(req, start, permit, tries)
        finally:
            self.in_request.discard(task)

    async def _exchange(self, req: ApiRequest, start: float, permit: Permit, tries: _Tries
                        ) -> tuple[Completion, Head, float | None]:
        """One request and its whole answer, under the attempt's total deadline."""
        deadline = self.settings.attempt_deadline
        try:
            async with asyncio.timeout(deadline) as cm:
                return await self._converse(req, start, permit, tries)
        except TimeoutError:
            if not cm.expired():
                raise
            raise Retryable(f"the attempt took longer than {deadline:g} s "
                            "(--attempt-timeout)", "timeout") from None

    async def _converse(self, req: ApiRequest, start: float, permit: Permit, tries: _Tries
                        ) -> tuple[Completion, Head, float | None]:
        async with self.transport.open(req) as (head, chunks):
            tries.request_id = head.request_id
            self.limiter.observe(head.headers, permit, refused=head.status == 429)
            if not 200 <= head.status < 300:
                body = await self.transport.read_body(chunks)
                raise classify_http(head.status, head.headers, body)
            self.limiter.admitted(permit)
            if head.content_type == "application/json":
                return await self.reader.json_body(chunks), head, None
            completion, first = await self.reader.stream(chunks)
        return completion, head, None if first is None else first - start


def _seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
