"""The simulator's Anthropic Message Batches routes (docs/protocol.md §17.2)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from aiohttp import web

from .batch_state import (
    BATCH,
    CUSTOM_ID,
    BatchState,
    SimBatch,
    cancel_batch,
    error_answer,
    find_batch,
    list_page,
    new_batch,
    refuse_key,
    result_counts,
    start_work,
    status_now,
    stream_lines,
)
from .batch_work import anthropic_line


def _anthropic_batch(state: BatchState, b: SimBatch, request: web.Request) -> dict[str, Any]:
    status = status_now(state, b)
    ended = status in ("completed", "expired", "cancelled")
    c = result_counts(b)
    base = f"{request.scheme}://{request.host}"
    return {"id": b.id, "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": {"processing": 0 if ended else len(b.requests),
                               "succeeded": c["succeeded"], "errored": c["errored"],
                               "canceled": c["expired"] if b.cancelled else 0,
                               "expired": 0 if b.cancelled else c["expired"]},
            "created_at": _iso(b.created_at), "expires_at": _iso(b.created_at + 86400),
            "ended_at": _iso(time.time()) if ended else None,
            "cancel_initiated_at": _iso(b.created_at) if b.cancelled else None,
            "results_url": f"{base}/v1/messages/batches/{b.id}/results" if ended else None}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


async def create_anthropic(request: web.Request) -> web.Response:
    state = request.app[BATCH]
    state.calls["create"] += 1
    if (denied := refuse_key(request, "anthropic")) is not None:
        return denied
    raw = await request.read()
    if len(raw) > state.config.max_bytes:
        return error_answer(413, f"Request exceeds the maximum size of {state.config.max_bytes} "
                           "bytes", "anthropic")
    try:
        items = json.loads(raw)["requests"]
        requests = [(r["custom_id"], r["params"]) for r in items]
    except (ValueError, KeyError, TypeError):
        return error_answer(400, "requests: a list of {custom_id, params} is required", "anthropic")
    ids = [cid for cid, _ in requests]
    if not requests or len(requests) > state.config.max_requests:
        return error_answer(400, f"requests: between 1 and {state.config.max_requests} items",
                      "anthropic")
    if len(set(ids)) != len(ids) or not all(isinstance(c, str) and CUSTOM_ID.match(c)
                                            for c in ids):
        return error_answer(400, "custom_id must be unique and match ^[a-zA-Z0-9_-]{1,64}$",
                      "anthropic")
    b = new_batch(state, "anthropic", f"msgbatch_{secrets.token_hex(12)}", requests, None)
    start_work(state, b)
    await asyncio.sleep(state.config.create_delay)
    return web.json_response(_anthropic_batch(state, b, request))


async def get_anthropic(request: web.Request) -> web.Response:
    if (denied := refuse_key(request, "anthropic")) is not None:
        return denied
    b = find_batch(request, "anthropic")
    if b is None:
        return error_answer(404, "No such batch", "anthropic")
    return web.json_response(_anthropic_batch(request.app[BATCH], b, request))


async def list_anthropic(request: web.Request) -> web.Response:
    state = request.app[BATCH]
    found = [b for b in reversed(state.batches.values()) if b.api == "anthropic"]
    return list_page(request, [_anthropic_batch(state, b, request) for b in found], "after_id",
                 "anthropic")


async def results_anthropic(request: web.Request) -> web.StreamResponse:
    if (denied := refuse_key(request, "anthropic")) is not None:
        return denied
    state, b = request.app[BATCH], find_batch(request, "anthropic")
    if b is None:
        return error_answer(404, "No such batch", "anthropic")
    if status_now(state, b) not in ("completed", "expired", "cancelled"):
        return error_answer(400, "the batch is still processing", "anthropic")
    lines = [anthropic_line(a, b.cancelled) for a in b.answers or []]
    return await stream_lines(request, lines, state)



async def cancel_anthropic(request: web.Request) -> web.Response:
    if (denied := refuse_key(request, "anthropic")) is not None:
        return denied
    state, b = request.app[BATCH], find_batch(request, "anthropic")
    if b is None:
        return error_answer(404, "No such batch", "anthropic")
    cancel_batch(state, b)
    return web.json_response(_anthropic_batch(state, b, request))
