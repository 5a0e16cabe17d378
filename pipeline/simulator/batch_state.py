"""The simulator's batch state, shared by both batch APIs' routes: batches in memory, how
a batch moves on with the clock, error bodies, auth, listing pages, streamed lines."""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .batch_work import DIALECTS, MAX_CUSTOM_ID, Answer, BatchConfig, answer_all, openai_line

CUSTOM_ID = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_CUSTOM_ID}}}$")
COMPLETION_WINDOW = 24 * 3600


@dataclass
class SimBatch:
    id: str
    api: str
    created_at: float
    ends_at: float
    requests: list[tuple[str, Any]]
    metadata: dict[str, Any] | None = None
    input_file_id: str | None = None
    answers: list[Answer] | None = None   # set when processing finished
    errors: list[dict[str, Any]] | None = None  # validation failed: status "failed"
    cancelled: bool = False
    output_file_id: str | None = None
    error_file_id: str | None = None
    ended: bool = False


@dataclass
class BatchState:
    config: BatchConfig
    seed: int
    sim_config: Any
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # id → (name, data)
    batches: dict[str, SimBatch] = field(default_factory=dict)
    creates: int = 0        # batches created (both APIs)
    uploads: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=random.Random)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


BATCH = web.AppKey("BATCH", BatchState)


def error_answer(status: int, message: str, api: str) -> web.Response:
    if api == "anthropic":
        kind = {400: "invalid_request_error", 404: "not_found_error",
                413: "request_too_large", 401: "authentication_error"}.get(status, "api_error")
        return web.json_response({"type": "error", "error": {"type": kind, "message": message}},
                                 status=status)
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "param": None, "code": None}}, status=status)


INVALID_KEY = "sk-invalid"  # the same key app.INVALID_KEY refuses (a test checks)


def refuse_key(request: web.Request, api: str) -> web.Response | None:
    if DIALECTS[api].api_key(request) == INVALID_KEY:
        return error_answer(401, "Incorrect API key provided", api)
    return None


# ---------------------------------------------------------------- processing


def start_work(state: BatchState, batch: SimBatch) -> None:
    async def work() -> None:
        answers = await answer_all(DIALECTS[batch.api], batch.requests, state.sim_config,
                                   state.config, state.rng, state.seed)
        if not batch.cancelled:  # a cancel while it ran: nothing of it counts
            batch.answers = answers

    task = asyncio.get_running_loop().create_task(work())
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


def status_now(state: BatchState, b: SimBatch) -> str:
    """The batch's state now (it moves on with the clock, and when its answers exist)."""
    if b.errors is not None:
        return "failed"
    if b.cancelled:
        return "cancelled"
    if b.answers is None or time.time() < b.ends_at:
        return "in_progress" if time.time() >= b.created_at + 0.01 else "validating"
    if not b.ended:
        finish_batch(state, b)
    return "expired" if any(a.status == 0 for a in b.answers) else "completed"


def finish_batch(state: BatchState, b: SimBatch) -> None:
    b.ended = True
    if b.api != "openai":
        return
    out: list[bytes] = []
    err: list[bytes] = []
    for a in b.answers or []:
        kind, line = openai_line(a, b.cancelled, not b.cancelled)
        (out if kind == "output" else err).append(line)
    if out:
        b.output_file_id = store_file(state, f"{b.id}_output.jsonl", b"".join(out))
    if err:
        b.error_file_id = store_file(state, f"{b.id}error_answer.jsonl", b"".join(err))


def store_file(state: BatchState, name: str, data: bytes) -> str:
    fid = f"file-{secrets.token_hex(12)}"
    state.files[fid] = (name, data)
    return fid


def result_counts(b: SimBatch) -> Counter[str]:
    c: Counter[str] = Counter()
    for a in (b.answers or []) if b.ended else []:
        c["succeeded" if a.status == 200 else "expired" if a.status == 0 else "errored"] += 1
    return c


async def stream_lines(request: web.Request, lines: list[bytes], state: BatchState
                        ) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/jsonl"})
    await response.prepare(request)
    for line in lines:
        await response.write(line)
        if state.config.line_delay:
            await asyncio.sleep(state.config.line_delay)
    await response.write_eof()
    return response


def new_batch(state: BatchState, api: str, bid: str, requests: list[tuple[str, Any]],
         metadata: Any) -> SimBatch:
    now = time.time()
    b = SimBatch(bid, api, now, now + state.config.delay, requests,
                 metadata if isinstance(metadata, dict) else None)
    state.batches[bid] = b
    state.creates += 1
    return b


def find_batch(request: web.Request, api: str) -> SimBatch | None:
    b = request.app[BATCH].batches.get(request.match_info["batch_id"])
    return b if b is not None and b.api == api else None


def list_page(request: web.Request, docs: list[dict[str, Any]], cursor: str, api: str
          ) -> web.Response:
    """Newest first, ``limit`` a page (default 20, at most 100), after the cursor id."""
    try:
        limit = min(100, max(1, int(request.query.get("limit", "20"))))
    except ValueError:
        return error_answer(400, "limit must be an integer", api)
    after = request.query.get(cursor)
    ids = [d["id"] for d in docs]
    start = ids.index(after) + 1 if after in ids else 0
    page = docs[start:start + limit]
    body: dict[str, Any] = {"data": page, "has_more": start + limit < len(docs)}
    if api == "openai":
        body.update(object="list", first_id=page[0]["id"] if page else None,
                    last_id=page[-1]["id"] if page else None)
    else:
        body.update(first_id=page[0]["id"] if page else None,
                    last_id=page[-1]["id"] if page else None)
    return web.json_response(body)



def cancel_batch(state: BatchState, b: SimBatch) -> None:
    """Nothing of a batch cancelled before it ended counts (its requests: canceled)."""
    if not b.ended and b.errors is None:
        b.cancelled = True
        b.answers = [Answer(cid) for cid, _ in b.requests]
        finish_batch(state, b)
