"""The OpenAI Responses dialect of the local gateway SIMULATOR (``POST /v1/responses``).

Typed events, each with a ``sequence_number`` and its ``type`` repeated as the SSE event
name, from ``response.created`` to ``response.completed`` (or ``response.incomplete``
with ``incomplete_details.reason: "max_output_tokens"``), no ``[DONE]``
(docs/protocol.md §14.2); the non-streamed response object; OpenAI's error bodies and
``x-ratelimit-*`` headers. A thinking model streams a reasoning item (summary deltas)
first; a function offered is answered by a ``function_call`` item whose arguments stream
as ``response.function_call_arguments.delta``; a refusal is a ``refusal`` content part.
The ``[gap]`` prompt trigger skips one sequence number.

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...):
a client bug must not be mirrored by the server it is tested against.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .behaviour import TOOL_NAME, with_traits
from .captions import BadRequest, ImageInfo, Prompt, decode_data_uri, inspect_image, url_image
from .errors import ApiError
from .limits import RateLimits
from .wire import (
    OPENAI,
    Choice,
    Frame,
    Job,
    Plan,
    bearer,
    flag,
    model_of,
    positive_int,
    sse_frame,
)

if TYPE_CHECKING:
    from .app import SimConfig

__all__ = ["RESPONSES", "ResponsesDialect", "parse_input"]

_GAP_AFTER = 3  # the [gap] trigger skips the sequence number after this many events


def parse_input(instructions: Any, items: Any) -> Prompt:
    """``input``: a string, or messages whose content is a string or input_text /
    input_image parts; ``instructions`` is the system text."""
    texts = [instructions] if isinstance(instructions, str) and instructions else []
    images: list[ImageInfo] = []
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("'input' must be a string or a non-empty array", "input")
    for position, item in enumerate(items):
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise BadRequest(f"input[{position}].content must be a string or an array")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "input_image" and isinstance(part.get("image_url"), str):
                url = part["image_url"]
                images.append(url_image(url) if url.startswith(("http://", "https://"))
                              else inspect_image(decode_data_uri(url)))
            else:
                raise BadRequest(f"input[{position}].content: unsupported part {kind!r}")
    system = 1 if isinstance(instructions, str) and instructions else 0
    answered = any(isinstance(i, dict) and i.get("role") == "assistant" for i in items)
    return Prompt(" ".join(texts), tuple(images), len(items) + system, answered)


class ResponsesDialect:
    """The Responses API's typed event stream."""

    request_id_header = "x-request-id"

    def api_key(self, request: web.Request) -> str | None:
        return bearer(request)

    async def parse(self, body: dict[str, Any], config: SimConfig, request_id: str) -> Job:
        model, stream = model_of(body), flag(body, "stream")
        limit = positive_int(body, "max_output_tokens") or config.max_tokens_default
        prompt = await asyncio.to_thread(parse_input, body.get("instructions"), body.get("input"))
        text = _object(body.get("text"))
        json_mode = _object(text.get("format")).get("type") in ("json_object", "json_schema")
        job = Job(request_id, model, prompt, stream, True, limit, 1,
                  f"resp_{secrets.token_hex(12)}", int(time.time()), json_mode)
        effort = _object(body.get("reasoning")).get("effort")
        return with_traits(job, effort if isinstance(effort, str) else None,
                           bool(body.get("tools")))

    def error(self, err: ApiError, request_id: str) -> web.Response:
        return OPENAI.error(err, request_id)

    def limit_headers(self, limits: RateLimits) -> dict[str, str]:
        return OPENAI.limit_headers(limits)

    def plan(self, job: Job, choices: tuple[Choice, ...]) -> Plan:
        c, seq = choices[0], _Sequence(job.gap)
        head = [seq.event("response.created", response=self._response(job, c, "in_progress")),
                seq.event("response.in_progress",
                          response=self._response(job, c, "in_progress"))]
        index = 0
        if c.thoughts:
            item = {"type": "reasoning", "id": "rs_sim", "summary": []}
            head.append(seq.event("response.output_item.added", output_index=0, item=item))
            head += [seq.token("response.reasoning_summary_text.delta", item_id="rs_sim",
                               output_index=0, summary_index=0, delta=p) for p in c.thoughts]
            head.append(seq.event("response.output_item.done", output_index=0, item=item))
            index = 1
        item, part, kind = self._item(job, index)
        head.append(seq.event("response.output_item.added", output_index=index, item=item))
        if part is not None:
            head.append(seq.event("response.content_part.added", item_id=item["id"],
                                  output_index=index, content_index=0, part=part))
        tokens = tuple(seq.token(kind, item_id=item["id"], output_index=index,
                                 content_index=0, delta=p) for p in c.pieces)
        status = "completed" if c.finish == "stop" else "incomplete"
        tail = (seq.event(kind.replace(".delta", ".done"), item_id=item["id"],
                          output_index=index),
                seq.event("response.output_item.done", output_index=index, item=item),
                seq.event(f"response.{status}", response=self._response(job, c, status)))
        return Plan(tuple(head), tokens, tail)

    @staticmethod
    def _item(job: Job, index: int) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
        """The output item that carries the answer, its content part, its delta type."""
        if job.tool and not job.refuse:
            item: dict[str, Any] = {"type": "function_call", "id": f"fc_{index}",
                                    "call_id": "call_sim", "name": TOOL_NAME, "arguments": ""}
            return item, None, "response.function_call_arguments.delta"
        item = {"type": "message", "id": f"msg_{index}", "role": "assistant", "content": []}
        if job.refuse:
            return item, {"type": "refusal", "refusal": ""}, "response.refusal.delta"
        return item, {"type": "output_text", "text": ""}, "response.output_text.delta"

    def _response(self, job: Job, c: Choice, status: str) -> dict[str, Any]:
        done = status in ("completed", "incomplete")
        out: dict[str, Any] = {
            "id": job.response_id, "object": "response", "created_at": job.created,
            "status": status, "model": job.model, "output": self._output(job, c) if done else [],
            "usage": self._usage(job, c) if done else None,
        }  # fmt: skip
        if status == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        return out

    def _output(self, job: Job, c: Choice) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if c.thoughts:
            out.append({"type": "reasoning", "id": "rs_sim", "summary": []})
        item, part, _ = self._item(job, len(out))
        if part is None:
            item = {**item, "arguments": c.text, "status": "completed"}
        else:
            key = "refusal" if part["type"] == "refusal" else "text"
            item = {**item, "content": [{**part, key: c.text}], "status": "completed"}
        return [*out, item]

    @staticmethod
    def _usage(job: Job, c: Choice) -> dict[str, Any]:
        prompt = job.prompt.tokens
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": c.tokens,
                "output_tokens_details": {"reasoning_tokens": len(c.thoughts)},
                "total_tokens": prompt + c.tokens}

    def endings(self) -> dict[str, tuple[Frame, ...]]:
        error = {"type": "error", "code": "server_error", "param": None,
                 "message": "The server had an error while processing your request."}
        return {
            "error_event": (sse_frame(error, "error"),),
            "bad_json": (Frame(b"event: response.output_text.delta\ndata: {not json\n\n"),),
            "done_no_finish": (),  # EOF without response.completed
        }

    def body(self, job: Job, choices: tuple[Choice, ...], finished: bool) -> dict[str, Any]:
        c = choices[0]
        status = ("completed" if c.finish == "stop" else "incomplete") if finished \
            else "in_progress"
        return self._response(job, c, status) | (
            {} if finished else {"output": self._output(job, c)})


def _object(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


class _Sequence:
    """Numbers the events of one stream; with ``gap``, one number is never sent."""

    def __init__(self, gap: bool) -> None:
        self.n, self.gap = 0, gap

    def event(self, kind: str, **fields: Any) -> Frame:
        if self.gap and self.n == _GAP_AFTER:
            self.n += 1  # this number is lost on the way
        frame = sse_frame({"type": kind, "sequence_number": self.n, **fields}, kind)
        self.n += 1
        return frame

    def token(self, kind: str, **fields: Any) -> Frame:
        return Frame(self.event(kind, **fields).data, token=True)


RESPONSES = ResponsesDialect()
