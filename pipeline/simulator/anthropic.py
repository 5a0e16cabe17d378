"""The Anthropic Messages dialect of the local gateway SIMULATOR.

Named events from ``message_start`` to ``message_stop`` (docs/protocol.md §3.2), the
non-streamed message, error bodies and the ``anthropic-ratelimit-*`` headers (§5.3).
A thinking model's reasoning is a ``thinking`` block before the text; a function offered
is answered by a ``tool_use`` block whose input streams as ``input_json_delta``; a
refusal ends with ``stop_reason: "refusal"``.

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .behaviour import TOOL_NAME, with_traits
from .captions import BadRequest, parse_anthropic_messages
from .errors import ApiError, retry_after_header
from .limits import RateLimits
from .wire import (
    Choice,
    Frame,
    Job,
    Plan,
    bearer,
    flag,
    model_of,
    positive_int,
    sse_frame,
    token_frame,
)

if TYPE_CHECKING:
    from .app import SimConfig

__all__ = ["ANTHROPIC", "AnthropicDialect"]

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def _stop_reason(job: Job, finish: str) -> str:
    if job.refuse:
        return "refusal"
    return "tool_use" if job.tool and finish == "stop" else _STOP_REASONS[finish]


class AnthropicDialect:
    """Messages API: named events from message_start to message_stop (ref. 3)."""

    request_id_header = "request-id"

    def api_key(self, request: web.Request) -> str | None:
        return request.headers.get("x-api-key") or bearer(request)

    async def parse(self, body: dict[str, Any], config: SimConfig, request_id: str) -> Job:
        model, stream = model_of(body), flag(body, "stream")
        max_tokens = positive_int(body, "max_tokens")
        if max_tokens is None:  # required by the real API; a client that omits it is buggy
            raise BadRequest("max_tokens: Field required", "max_tokens")
        system, messages = body.get("system"), body.get("messages")
        prompt = await asyncio.to_thread(parse_anthropic_messages, system, messages)
        response_id = f"msg_{secrets.token_hex(12)}"
        created = int(time.time())
        job = Job(request_id, model, prompt, stream, True, max_tokens, 1, response_id, created)
        thinking = body.get("thinking")
        thinking = thinking if isinstance(thinking, dict) else {}
        effort = "none" if thinking.get("type") == "disabled" else None
        budget = thinking.get("budget_tokens")
        return with_traits(job, effort, bool(body.get("tools")),
                           budget if isinstance(budget, int) else None)

    def error(self, err: ApiError, request_id: str) -> web.Response:
        detail = {"type": err.anthropic_type, "message": err.message}
        headers = {self.request_id_header: request_id}
        if err.retry_after is not None:  # Anthropic sends whole seconds
            headers["retry-after"] = retry_after_header(err.retry_after, whole_seconds=True)
        if err.status == 400:
            headers["x-should-retry"] = "false"
        body = {"type": "error", "error": detail, "request_id": request_id}
        return web.json_response(body, status=err.status, headers=headers)

    def plan(self, job: Job, choices: tuple[Choice, ...]) -> Plan:
        choice = choices[0]
        usage = {"input_tokens": job.prompt.tokens, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0, "output_tokens": 1}  # fmt: skip
        message: dict[str, Any] = {
            "id": job.response_id, "type": "message", "role": "assistant", "content": [],
            "model": job.model, "stop_reason": None, "stop_sequence": None, "usage": usage,
        }  # fmt: skip
        head: list[Frame] = [_event("message_start", message=message)]
        index = 0
        if choice.thoughts:
            head.append(_event("content_block_start", index=0,
                               content_block={"type": "thinking", "thinking": ""}))
            head += [token_frame(_event("content_block_delta", index=0, delta={
                "type": "thinking_delta", "thinking": piece})) for piece in choice.thoughts]
            head.append(_event("content_block_stop", index=0))
            index = 1
        head += [_event("content_block_start", index=index, content_block=self._block(job)),
                 _event("ping")]
        tokens = tuple(token_frame(self._delta(job, index, piece)) for piece in choice.pieces)
        delta = {"stop_reason": _stop_reason(job, choice.finish), "stop_sequence": None}
        output = {"output_tokens": max(1, choice.tokens)}
        tail = (
            _event("content_block_stop", index=index),
            _event("message_delta", delta=delta, usage=output),
            _event("message_stop"),
        )
        return Plan(tuple(head), tokens, tail)

    def endings(self) -> dict[str, tuple[Frame, ...]]:
        overloaded = {"type": "overloaded_error", "message": "Overloaded"}
        return {
            "error_event": (_event("error", error=overloaded),),
            "bad_json": (Frame(b"event: content_block_delta\ndata: {not json\n\n"),),
            "done_no_finish": (_event("content_block_stop", index=0), _event("message_stop")),
        }

    def body(self, job: Job, choices: tuple[Choice, ...], finished: bool) -> dict[str, Any]:
        choice = choices[0]
        usage = {"input_tokens": job.prompt.tokens, "output_tokens": max(1, choice.tokens)}
        content: list[dict[str, Any]] = []
        if choice.thoughts:
            content.append({"type": "thinking", "thinking": "".join(choice.thoughts),
                            "signature": "sim"})
        if job.tool and not job.refuse:
            try:
                args = json.loads(choice.text)
            except ValueError:  # cut by max_tokens: the API would send what parsed
                args = {}
            content.append({"type": "tool_use", "id": "toolu_sim", "name": TOOL_NAME,
                            "input": args})
        else:
            content.append({"type": "text", "text": choice.text})
        return {
            "id": job.response_id, "type": "message", "role": "assistant", "model": job.model,
            "content": content,
            "stop_reason": _stop_reason(job, choice.finish) if finished else None,
            "stop_sequence": None, "usage": usage,
        }  # fmt: skip

    def limit_headers(self, limits: RateLimits) -> dict[str, str]:
        headers, now = {}, datetime.now(UTC)
        for kind, bucket in limits.buckets.items():
            reset = now + timedelta(seconds=math.ceil(bucket.reset_seconds()))
            prefix = f"anthropic-ratelimit-{kind}"
            headers[f"{prefix}-limit"] = str(bucket.limit)
            headers[f"{prefix}-remaining"] = str(max(0, math.floor(bucket.remaining())))
            headers[f"{prefix}-reset"] = reset.strftime("%Y-%m-%dT%H:%M:%SZ")
        return headers

    @staticmethod
    def _block(job: Job) -> dict[str, Any]:
        if job.tool and not job.refuse:
            return {"type": "tool_use", "id": "toolu_sim", "name": TOOL_NAME, "input": {}}
        return {"type": "text", "text": ""}

    @staticmethod
    def _delta(job: Job, index: int, piece: str) -> Frame:
        if job.tool and not job.refuse:
            delta = {"type": "input_json_delta", "partial_json": piece}
        else:
            delta = {"type": "text_delta", "text": piece}
        return _event("content_block_delta", index=index, delta=delta)


def _event(name: str, **fields: Any) -> Frame:
    """An Anthropic event: the SSE `event:` name repeats the JSON `type`."""
    return sse_frame({"type": name, **fields}, name)


ANTHROPIC = AnthropicDialect()
