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
from dataclasses import replace
from typing import Any

from ..wire.adapters.base import Adapter, StreamState, normalize_finish, structured_columns
from ..pacing.cost import BudgetReached, CostBudget
from ..images.dedupe import Dedupe, dedup_key
from ..errors import (
    PipelineError,
    Retryable,
    RowFailed,
    RunFatal,
    bad_response,
    classify_http,
)
from ..wire.endpoint import EndpointWatch
from ..images.load import ImageSource
from ..keys import ImageRefs
from ..sources.plan import variants
from ..pacing.limiter import Limiter
from ..records import (
    ApiRequest,
    Completion,
    ManifestRow,
    PreparedImage,
    Usage,
    ResultRow,
    copied_row,
    error_row,
    ok_row,
    prompt_sha256,
)
from ..pacing.retry import RetryPolicy
from ..settings import Settings
from ..wire.sse import SSEDecoder, StreamTooLong
from ..wire.channel import Channel, Head

log = logging.getLogger("pipeline")

# A reasoning_exhausted answer is sent once more with this many times max_tokens.
REASONING_RETRY_FACTOR = 4
# How a retryable failure feeds the limiter: "slow down" versus "server busy".
_OUTCOME = {"rate_limit": "throttled", "overloaded": "overloaded"}


def _utf8_quirk(c: Completion, decoder: SSEDecoder) -> Completion:
    if not decoder.invalid_utf8:
        return c
    return replace(c, quirks={**c.quirks, "invalid_utf8": decoder.invalid_utf8})


class Interrupted(Exception):
    """The run is stopping: leave the row unwritten (pending) instead of retrying it."""


class Worker:
    def __init__(self, settings: Settings, adapter: Adapter, transport: Channel,
                 images: ImageSource, limiter: Limiter, policy: RetryPolicy,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 should_stop: Callable[[], bool] = lambda: False,
                 dedupe: Dedupe | None = None, budget: CostBudget | None = None,
                 image_refs: ImageRefs | None = None,
                 endpoint: EndpointWatch | None = None) -> None:
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
        self.in_request: set[asyncio.Task[Any] | None] = set()  # tasks with a request open

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
        attempts = 0
        waited: float | None = None
        while True:
            attempts += 1
            start = self.clock()
            try:
                result = await self._attempt_row(row, req, attempts, waited)
                self.endpoint.success()
                return result
            except RunFatal as e:
                raise self.endpoint.fatal(e) from None  # with the URL, or the key's source
            except Retryable as e:
                if self.endpoint.probing(e):  # the endpoint may be wrong: no error row yet
                    await self.sleep(self.policy.next_delay(attempts))
                    continue
                if not self.policy.may_retry(attempts):
                    return self._failed(row, e, attempts, start, waited,
                                        suffix=f" (gave up after {attempts} attempts)")
                if self.should_stop():
                    raise Interrupted from e
                delay = self.policy.next_delay(attempts, e.retry_after)
                log.debug("row %s: attempt %d failed (%s: %s); retrying in %.2f s", row.id,
                          attempts, e.error_class, e.message, delay)
                if e.retry_after is not None:
                    waited = delay
                if e.error_class == "rate_limit":
                    self.limiter.gate.pause(delay)  # one 429 slows the whole pool
                else:
                    await self.sleep(delay)
            except RowFailed as e:
                if self.endpoint.probing(e):
                    await self.sleep(self.policy.next_delay(attempts))
                    continue
                if e.error_class == "reasoning_exhausted" and more_room is not None:
                    bigger, more_room = more_room(), None  # once per row
                    if bigger is not None:
                        log.debug("row %s: the model reasoned until max_tokens; once more "
                                  "with max_tokens %d", row.id, bigger.est_output_tokens)
                        req = bigger
                        continue
                return self._failed(row, e, attempts, start, waited)

    async def _attempt_row(self, row: ManifestRow, req: ApiRequest, attempts: int,
                           waited: float | None) -> ResultRow:
        """One attempt under the cost budget and the limiter: the ok row, or it raises."""
        reserved = self.budget.reserve(req.est_input_tokens, req.est_output_tokens) \
            if self.budget else 0.0  # BudgetReached propagates: the run stops taking rows
        permit = await self.limiter.acquire(req.est_input_tokens, req.est_output_tokens)
        if self.should_stop():  # the run stopped while this row waited: send nothing
            self.limiter.finish(permit, "unsent")
            if self.budget:
                self.budget.settle(reserved, 0, 0)
            raise Interrupted
        start = self.clock()
        outcome, usage = "error", None
        try:
            completion, head, ttft = await self._attempt(req, start)
            usage = completion.usage
            structured = structured_columns(completion.text, self.settings.options)
            outcome = "ok"
        except PipelineError as e:
            usage, outcome = e.usage, _OUTCOME.get(e.error_class, "error")
            e.latency = self.clock() - start
            raise
        finally:
            cost = self._settle(reserved, usage)
            self.limiter.finish(permit, outcome, usage and usage.prompt_tokens,
                                usage and usage.completion_tokens)
        return ok_row(row, completion, attempts=attempts, latency_s=self.clock() - start,
                      ttft_s=ttft, request_id=head.request_id, http_status=head.status,
                      retry_after_s=waited, cost_usd=cost, **structured)

    def _settle(self, reserved: float, usage: Usage | None) -> float | None:
        if self.budget is None:
            return None
        tokens_in = usage.prompt_tokens if usage else None
        tokens_out = usage.completion_tokens if usage else None
        return self.budget.settle(reserved, tokens_in, tokens_out)

    def _failed(self, row: ManifestRow, e: PipelineError, attempts: int, start: float,
                waited: float | None, suffix: str = "") -> ResultRow:
        latency = e.latency if e.latency is not None else self.clock() - start
        log.debug("row %s: failed after %d attempt(s) (%s): %s%s", row.id, attempts,
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
        return error_row(row, e.message + suffix, e.error_class, attempts=attempts,
                         latency_s=latency, http_status=e.http_status,
                         retry_after_s=waited, request_id=e.request_id, **columns)

    async def _attempt(self, req: ApiRequest, start: float
                       ) -> tuple[Completion, Head, float | None]:
        task = asyncio.current_task()
        self.in_request.add(task)
        try:
            return await self._exchange(req, start)
        finally:
            self.in_request.discard(task)

    async def _exchange(self, req: ApiRequest, start: float
                        ) -> tuple[Completion, Head, float | None]:
        """One request and its whole answer, under the attempt's total deadline."""
        deadline = self.settings.attempt_deadline
        try:
            async with asyncio.timeout(deadline) as cm:
                return await self._converse(req, start)
        except TimeoutError:
            if not cm.expired():
                raise
            raise Retryable(f"the attempt took longer than {deadline:g} s "
                            "(--attempt-timeout)", "timeout") from None

    async def _converse(self, req: ApiRequest, start: float
                        ) -> tuple[Completion, Head, float | None]:
        async with self.transport.open(req) as (head, chunks):
            self.limiter.observe(head.headers)
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
        """Fold an event stream, within the line and response caps. A body whose first
        byte opens a JSON document is one: a gateway that labels a whole completion
        ``text/event-stream`` (it is read as the completion it is)."""
        state = self.adapter.new_state(self.settings.options.n)
        decoder = SSEDecoder(self.settings.line_cap)
        cap = self.settings.response_cap
        size, sniffing = 0, True
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > cap:
                    raise _too_large(cap, "the streamed response")
                if sniffing and chunk.strip():
                    sniffing = False
                    if chunk.lstrip()[:1] in (b"{", b"["):
                        body = await _collect(chunks, cap, chunk)
                        return self._json_in_stream(body, state, decoder), None
                if self._feed(state, decoder, chunk):
                    return _utf8_quirk(state.finish(), decoder), state.first_content_at
            for event in decoder.finish():
                if state.on_event(event, self.clock()):
                    break
            return _utf8_quirk(state.finish(), decoder), state.first_content_at
        except StreamTooLong as e:
            raise Retryable(f"broken stream: {e}", "stream_broken", http_status=200) from None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
            # A shape the adapter did not foresee: this answer is unusable, the batch
            # is not (the adapters name the shapes they know as bad_response).
            raise bad_response(f"unexpected stream content ({type(e).__name__}: {e})") from e

    def _feed(self, state: StreamState, decoder: SSEDecoder, data: bytes) -> bool:
        """Decode ``data`` into ``state``; True once the stream's terminator arrived."""
        clock = self.clock
        return any(state.on_event(event, clock()) for event in decoder.feed(data))

    def _json_in_stream(self, body: bytes, state: StreamState, decoder: SSEDecoder
                        ) -> Completion:
        try:
            doc = json.loads(body)
        except ValueError:  # JSON first, then something else: leave it to the fold
            if not self._feed(state, decoder, body):
                for event in decoder.finish():
                    if state.on_event(event, self.clock()):
                        break
            return state.finish()
        completion = self._from_json(doc)
        quirks = {**completion.quirks, "json_body_as_event_stream": 1}
        return replace(completion, quirks=quirks)

    async def _json_body(self, chunks: Any) -> Completion:
        """A 200 with a JSON body instead of a stream: a full completion or an error,
        read up to the response cap (not the small cap on error bodies)."""
        body = await _collect(chunks, self.settings.response_cap)
        try:
            doc = json.loads(body)
        except ValueError:
            raise Retryable("HTTP 200 with an unreadable JSON body", "stream_broken",
                            http_status=200) from None
        return self._from_json(doc)

    def _from_json(self, doc: Any) -> Completion:
        try:
            return self.adapter.from_json(_unwrap(doc))
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
            # Valid JSON of a shape no adapter foresaw: this answer is unusable (permanent,
            # docs/protocol.md §11), the batch is not.
            raise bad_response(f"unexpected JSON completion ({type(e).__name__}: {e})"
                               ) from e


async def _collect(chunks: Any, cap: int, prefix: bytes = b"") -> bytes:
    """The rest of a success body after ``prefix``; more than ``cap`` bytes fails."""
    parts, size = [prefix], len(prefix)
    async for chunk in chunks:
        size += len(chunk)
        if size > cap:
            raise _too_large(cap, "the JSON response")
        parts.append(chunk)
    return b"".join(parts)


def _too_large(cap: int, what: str) -> Retryable:
    return Retryable(f"{what} is larger than {cap} bytes (--max-response-bytes); the "
                     "server may be ignoring max_tokens", "stream_broken", http_status=200)


def _unwrap(doc: Any) -> Any:
    """Gemini-style errors come as a one-item list around the object."""
    if isinstance(doc, list) and len(doc) == 1 and isinstance(doc[0], dict):
        return doc[0]
    return doc
