"""One manifest row end to end: image → request → stream → fold → result row, with retries.

``process`` never raises for a row's problem: every outcome is a result row. Only a
``RunFatal`` (bad key, unknown model, exhausted quota) propagates, because every other
row would fail the same way. Text from a failed attempt is discarded: a caption comes
from exactly one complete attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from .adapters.base import Adapter, normalize_finish
from .cost import BudgetReached, CostBudget
from .dedupe import Dedupe, dedup_key
from .errors import PipelineError, Retryable, RowFailed, RunFatal, classify_http
from .images import ImageSource
from .options import render_prompt
from .plan import row_values
from .ratelimit import Limiter, Permit
from .records import (
    ApiRequest,
    Completion,
    ManifestRow,
    PreparedImage,
    Usage,
    copied_row,
    error_row,
    ok_row,
)
from .retry import RetryPolicy
from .settings import Settings
from .sse import SSEDecoder
from .transport import Head, Transport

log = logging.getLogger("pipeline")

# How a retryable failure feeds the limiter: "slow down" versus "server busy". Both are
# the rate limit: they never use up --retries (bounded by --max-rate-wait instead).
_OUTCOME = {"rate_limit": "throttled", "overloaded": "overloaded"}
_RATE_LIMITED = frozenset(_OUTCOME)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python accepts NaN/Infinity; JSON does not


class Interrupted(Exception):
    """The run is stopping: leave the row unwritten (pending) instead of retrying it."""


@dataclass
class _Tries:
    """One row's attempts so far, to decide on the next."""

    sent: int = 0          # attempts sent (the ``attempts`` column)
    failures: int = 0      # failures that count against --retries
    refusals: int = 0      # 429/529 refusals: bounded by --max-rate-wait instead
    rate_waited: float = 0.0  # seconds from those refusals to the next attempts
    refused_at: float | None = None
    waited: float | None = None  # the last server-directed wait (``retry_after_s``)


class Worker:
    def __init__(self, settings: Settings, adapter: Adapter, transport: Transport,
                 images: ImageSource, limiter: Limiter, policy: RetryPolicy,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 should_stop: Callable[[], bool] = lambda: False,
                 dedupe: Dedupe | None = None, budget: CostBudget | None = None) -> None:
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
        self.in_request: set[asyncio.Task[Any] | None] = set()  # tasks with a request open

    async def process(self, row: ManifestRow,
                      prepared: Awaitable[PreparedImage] | None = None) -> dict[str, Any]:
        """The result row for ``row``; ``prepared`` is its image if already under way."""
        if row.error:
            return error_row(row, row.error, "bad_input")
        if row.prompt is None:  # a row from outside the planner: the run's prompt, filled in
            row = replace(row, prompt=render_prompt(self.settings.prompt, row_values(row)))
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
        columns = image.columns()
        key = None
        if image.sha256 is not None and self.dedupe is not None:
            s = self.settings
            key = dedup_key(image.sha256, row.prompt or s.prompt, s.system, s.model)
            columns["dedup_key"] = key
            original = await self.dedupe.claim(key)
            if original is not None:
                return copied_row(row, original, **columns)
        result = None
        try:
            try:
                req = self.adapter.build_request(row, image, self.settings)
                result = await self._with_retries(row, req)
            except (RunFatal, Interrupted, BudgetReached):
                raise
            except Exception as e:  # a bug or an unforeseen input: one row, not the batch
                log.exception("row %s: failed unexpectedly", row.id)
                result = error_row(row, f"internal error: {type(e).__name__}: {e}",
                                   "internal")
            result.update(columns)
            return result
        finally:
            if key is not None and self.dedupe is not None:
                self.dedupe.resolve(key, result)

    async def _with_retries(self, row: ManifestRow, req: ApiRequest) -> dict[str, Any]:
        """Attempts until one succeeds, the retries run out, or the row has waited
        ``--max-rate-wait`` in total for the rate limit (429/529 never use up retries)."""
        tries = _Tries()
        while True:
            tries.sent += 1
            start = self.clock()
            try:
                return await self._attempt_row(row, req, tries.sent, tries.waited)
            except Retryable as e:
                delay, why = self._next_wait(e, tries)
                if delay is None:
                    return self._failed(row, e, tries.sent, start, tries.waited, suffix=why)
                if self.should_stop():
                    raise Interrupted from e
                await self.sleep(delay)
            except RowFailed as e:
                return self._failed(row, e, tries.sent, start, tries.waited)

    def _next_wait(self, e: Retryable, t: _Tries) -> tuple[float | None, str]:
        """Seconds until the row's next attempt, or None and why it gives up."""
        if t.refused_at is not None and e.sent_at is not None:
            t.rate_waited += max(0.0, e.sent_at - t.refused_at)
        t.refused_at = None
        guided = self.policy.server_wait(e.retry_after) is not None
        if e.error_class in _RATE_LIMITED:
            t.refusals += 1
            delay = self.policy.rate_delay(t.refusals, e.retry_after)
            bound = self.policy.max_rate_wait
            if t.rate_waited + delay > bound:
                return None, (f" (gave up after {t.refusals} refusals and {t.rate_waited:.0f} s "
                              f"waiting for the rate limit; --max-rate-wait {bound:g})")
            t.refused_at = self.clock()
            if e.error_class == "rate_limit":  # a 429 slows the whole pool
                pool = self.policy.pool_delay(self.limiter.streak, e.retry_after)
                self.limiter.refused(pool, guided)
        else:
            t.failures += 1
            if not self.policy.may_retry(t.failures):
                return None, f" (gave up after {t.sent} attempts)"
            delay = self.policy.next_delay(t.failures, e.retry_after)
        if guided:
            t.waited = delay
        return delay, ""

    async def _attempt_row(self, row: ManifestRow, req: ApiRequest, attempts: int,
                           waited: float | None) -> dict[str, Any]:
        """One attempt under the limiter and the cost budget: the ok row, or it raises.

        Cost is reserved only once the rate permit is granted: a row waiting for the
        limiter holds no reservation, so a budget stop never has to cancel a row that
        the budget already paid for."""
        if self.budget is not None:
            self.budget.check(req.est_input_tokens, req.est_output_tokens)
        permit = await self.limiter.acquire(req.est_input_tokens, req.est_output_tokens)
        try:  # BudgetReached propagates: the run stops taking rows
            reserved = self.budget.reserve(req.est_input_tokens, req.est_output_tokens) \
                if self.budget else 0.0
        except BaseException:
            self.limiter.cancel(permit)
            raise
        start = self.clock()
        outcome, usage, retry_after = "error", None, None
        try:
            completion, head, ttft = await self._attempt(req, start, permit)
            usage = completion.usage
            structured = self._structured(completion)
            outcome = "ok"
        except PipelineError as e:
            usage, outcome = e.usage, _OUTCOME.get(e.error_class, "error")
            retry_after = e.retry_after
            e.latency = self.clock() - start
            e.sent_at = permit.sent_at
            raise
        finally:
            cost = self._settle(reserved, usage)
            self.limiter.finish(permit, outcome, usage and usage.prompt_tokens,
                                usage and usage.completion_tokens, retry_after)
        return ok_row(row, completion, attempts=attempts, latency_s=self.clock() - start,
                      ttft_s=ttft, request_id=head.request_id, http_status=head.status,
                      retry_after_s=waited, cost_usd=cost, **structured)

    def _settle(self, reserved: float, usage: Usage | None) -> float | None:
        if self.budget is None:
            return None
        tokens_in = usage.prompt_tokens if usage else None
        tokens_out = usage.completion_tokens if usage else None
        return self.budget.settle(reserved, tokens_in, tokens_out)

    def _structured(self, completion: Completion) -> dict[str, Any]:
        """With a response format, the caption must parse as JSON (else: try again)."""
        if self.settings.options.response_format is None:
            return {}
        try:
            doc = json.loads(completion.text, parse_constant=_no_constant)
        except ValueError as e:
            raise Retryable(f"the caption is not valid JSON ({e}): {completion.text[:80]!r}",
                            "invalid_json", http_status=200) from None
        return {"caption_json": json.dumps(doc, ensure_ascii=False), "json_valid": True}

    def _failed(self, row: ManifestRow, e: PipelineError, attempts: int, start: float,
                waited: float | None, suffix: str = "") -> dict[str, Any]:
        latency = e.latency if e.latency is not None else self.clock() - start
        out = error_row(row, e.message + suffix, e.error_class, attempts=attempts,
                        latency_s=latency, http_status=e.http_status,
                        retry_after_s=waited, request_id=e.request_id)
        if e.finish_reason_raw:
            out.update(finish_reason=normalize_finish(e.finish_reason_raw),
                       finish_reason_raw=e.finish_reason_raw)
        if e.error_class == "invalid_json":
            out["json_valid"] = False
        if e.usage is not None:  # tokens were spent even though the row failed
            out.update(prompt_tokens=e.usage.prompt_tokens,
                       completion_tokens=e.usage.completion_tokens,
                       total_tokens=e.usage.total_tokens, usage_source="reported")
            if self.budget is not None:
                out["cost_usd"] = self.budget.price.cost(e.usage.prompt_tokens,
                                                         e.usage.completion_tokens)
        return out

    async def _attempt(self, req: ApiRequest, start: float, permit: Permit
                       ) -> tuple[Completion, Head, float | None]:
        task = asyncio.current_task()
        self.in_request.add(task)
        try:
            return await self._exchange(req, start, permit)
        finally:
            self.in_request.discard(task)

    async def _exchange(self, req: ApiRequest, start: float, permit: Permit
                        ) -> tuple[Completion, Head, float | None]:
        async with self.transport.open(req) as (head, chunks):
            self.limiter.observe(head.headers, permit, refused=head.status == 429)
            if 200 <= head.status < 300:
                self.limiter.admitted(permit)
            try:
                if not 200 <= head.status < 300:
                    body = await self.transport.read_body(chunks)
                    raise classify_http(head.status, head.headers, body)
                if head.content_type == "application/json":
                    return await self._json_body(chunks), head, None
                completion, first = await self._stream(chunks)
            except PipelineError as e:
                e.request_id = head.request_id
                raise
        return completion, head, None if first is None else first - start

    async def _stream(self, chunks: Any) -> tuple[Completion, float | None]:
        state = self.adapter.new_state(self.settings.options.n)
        decoder = SSEDecoder()
        clock = self.clock
        try:
            async for chunk in chunks:
                for event in decoder.feed(chunk):
                    if state.on_event(event, clock()):
                        return state.finish(), state.first_content_at
            for event in decoder.finish():
                if state.on_event(event, clock()):
                    break
            return state.finish(), state.first_content_at
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
            # Valid JSON of a shape no protocol allows (``"choices": [null]``, a number
            # where an object belongs): this answer is broken, the batch is not.
            raise Retryable(f"unexpected stream content ({type(e).__name__}: {e})",
                            "stream_broken", http_status=200) from e

    async def _json_body(self, chunks: Any) -> Completion:
        """A 200 with a JSON body instead of a stream: a full completion or an error."""
        body = await self.transport.read_body(chunks)
        try:
            doc = json.loads(body)
        except ValueError:
            raise Retryable("HTTP 200 with an unreadable JSON body", "stream_broken",
                            http_status=200) from None
        return self.adapter.from_json(doc)
