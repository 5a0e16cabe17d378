"""The simulator's batch APIs: OpenAI Files + Batches, and Anthropic Message Batches.

OpenAI (docs/protocol.md §14.1): ``POST /v1/files`` (multipart, ``purpose=batch``),
``GET /v1/files``, ``GET /v1/files/{id}/content``, ``POST /v1/batches``,
``GET /v1/batches[/{id}]``, ``POST /v1/batches/{id}/cancel``. Anthropic (§14.2):
``POST /v1/messages/batches``, ``GET /v1/messages/batches[/{id}]``,
``GET /v1/messages/batches/{id}/results``, ``POST /v1/messages/batches/{id}/cancel``.

State lives in memory for the server's life. ``app[BATCH].creates`` counts every batch
created (tests of crash recovery read it: a resubmission would show as a second one).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from .batch_work import (
    DIALECTS,
    MAX_CUSTOM_ID,
    Answer,
    BatchConfig,
    answer_all,
    anthropic_line,
    openai_line,
)

__all__ = ["BATCH", "BatchConfig", "BatchState", "install"]

_CUSTOM_ID = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_CUSTOM_ID}}}$")
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


def _error(status: int, message: str, api: str) -> web.Response:
    if api == "anthropic":
        kind = {400: "invalid_request_error", 404: "not_found_error",
                413: "request_too_large", 401: "authentication_error"}.get(status, "api_error")
        return web.json_response({"type": "error", "error": {"type": kind, "message": message}},
                                 status=status)
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "param": None, "code": None}}, status=status)


INVALID_KEY = "sk-invalid"  # the same key app.INVALID_KEY refuses (a test checks)


def _auth(request: web.Request, api: str) -> web.Response | None:
    if DIALECTS[api].api_key(request) == INVALID_KEY:
        return _error(401, "Incorrect API key provided", api)
    return None


# ---------------------------------------------------------------- processing


def _start(state: BatchState, batch: SimBatch) -> None:
    async def work() -> None:
        answers = await answer_all(DIALECTS[batch.api], batch.requests, state.sim_config,
                                   state.config, state.rng, state.seed)
        if not batch.cancelled:  # a cancel while it ran: nothing of it counts
            batch.answers = answers

    task = asyncio.get_running_loop().create_task(work())
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


def _status(state: BatchState, b: SimBatch) -> str:
    """The batch's state now (it moves on with the clock, and when its answers exist)."""
    if b.errors is not None:
        return "failed"
    if b.cancelled:
        return "cancelled"
    if b.answers is None or time.time() < b.ends_at:
        return "in_progress" if time.time() >= b.created_at + 0.01 else "validating"
    if not b.ended:
        _finish(state, b)
    return "expired" if any(a.status == 0 for a in b.answers) else "completed"


def _finish(state: BatchState, b: SimBatch) -> None:
    b.ended = True
    if b.api != "openai":
        return
    out: list[bytes] = []
    err: list[bytes] = []
    for a in b.answers or []:
        kind, line = openai_line(a, b.cancelled, not b.cancelled)
        (out if kind == "output" else err).append(line)
    if out:
        b.output_file_id = _store(state, f"{b.id}_output.jsonl", b"".join(out))
    if err:
        b.error_file_id = _store(state, f"{b.id}_error.jsonl", b"".join(err))


def _store(state: BatchState, name: str, data: bytes) -> str:
    fid = f"file-{secrets.token_hex(12)}"
    state.files[fid] = (name, data)
    return fid


def _counts(b: SimBatch) -> Counter[str]:
    c: Counter[str] = Counter()
    for a in (b.answers or []) if b.ended else []:
        c["succeeded" if a.status == 200 else "expired" if a.status == 0 else "errored"] += 1
    return c


# ---------------------------------------------------------------- OpenAI


def _openai_batch(state: BatchState, b: SimBatch) -> dict[str, Any]:
    status = _status(state, b)
    c = _counts(b)
    return {"id": b.id, "object": "batch", "endpoint": "/v1/chat/completions",
            "errors": {"object": "list", "data": b.errors} if b.errors else None,
            "input_file_id": b.input_file_id, "completion_window": "24h", "status": status,
            "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
            "created_at": int(b.created_at), "expires_at": int(b.created_at) + COMPLETION_WINDOW,
            "request_counts": {"total": len(b.requests), "completed": c["succeeded"],
                               "failed": c["errored"] + c["expired"]},
            "metadata": b.metadata}


async def upload_file(request: web.Request) -> web.Response:
    state = request.app[BATCH]
    state.calls["upload"] += 1
    if (denied := _auth(request, "openai")) is not None:
        return denied
    await asyncio.sleep(state.config.upload_hold)  # not stored yet: a kill loses it
    reader = await request.multipart()
    purpose, name, data = None, "upload.jsonl", b""
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            return _error(400, "a nested multipart body is not a batch upload", "openai")
        if part.name == "purpose":
            purpose = (await part.text()).strip()
        elif part.name == "file":
            name = part.filename or name
            data = bytes(await part.read())
    if purpose != "batch":
        return _error(400, "purpose must be 'batch'", "openai")
    if len(data) > state.config.max_bytes:
        return _error(413, f"The file is {len(data)} bytes; the batch input limit is "
                           f"{state.config.max_bytes} bytes", "openai")
    fid = _store(state, name, data)
    state.uploads += 1
    await asyncio.sleep(state.config.upload_delay)  # stored: the answer may never arrive
    return web.json_response({"id": fid, "object": "file", "bytes": len(data),
                              "created_at": int(time.time()), "filename": name,
                              "purpose": "batch"})


async def list_files(request: web.Request) -> web.Response:
    state = request.app[BATCH]
    data = [{"id": fid, "object": "file", "bytes": len(d), "filename": n, "purpose": "batch"}
            for fid, (n, d) in state.files.items()]
    return web.json_response({"object": "list", "data": data, "has_more": False})


async def file_content(request: web.Request) -> web.StreamResponse:
    state = request.app[BATCH]
    if (denied := _auth(request, "openai")) is not None:
        return denied
    found = state.files.get(request.match_info["file_id"])
    if found is None:
        return _error(404, "No such File object", "openai")
    return await _stream_lines(request, found[1].splitlines(keepends=True), state)


async def _stream_lines(request: web.Request, lines: list[bytes], state: BatchState
                        ) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/jsonl"})
    await response.prepare(request)
    for line in lines:
        await response.write(line)
        if state.config.line_delay:
            await asyncio.sleep(state.config.line_delay)
    await response.write_eof()
    return response


def _parse_input(data: bytes, max_requests: int
                 ) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
    requests, errors, seen, models = [], [], set(), set()
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            doc = json.loads(raw)
            cid, body = doc["custom_id"], doc["body"]
            if doc.get("url") != "/v1/chat/completions" or doc.get("method") != "POST":
                raise ValueError("url must be /v1/chat/completions and method POST")
        except (ValueError, KeyError, TypeError) as e:
            errors.append({"code": "invalid_json_line", "message": str(e), "line": n})
            continue
        if not isinstance(cid, str) or cid in seen:
            errors.append({"code": "duplicate_custom_id", "message": "custom_id must be "
                           "unique text", "line": n})
        seen.add(cid)
        models.add(body.get("model") if isinstance(body, dict) else None)
        requests.append((cid, body))
    if len(models) > 1:
        errors.append({"code": "mixed_models", "message": "one model per file", "line": None})
    if len(requests) > max_requests:
        errors.append({"code": "too_many_requests", "message": f"at most {max_requests}",
                       "line": None})
    return requests, errors


async def create_openai(request: web.Request) -> web.Response:
    state = request.app[BATCH]
    state.calls["create"] += 1
    if (denied := _auth(request, "openai")) is not None:
        return denied
    try:
        doc = await request.json()
        fid = doc["input_file_id"]
    except (ValueError, KeyError, TypeError):
        return _error(400, "input_file_id is required", "openai")
    if fid not in state.files:
        return _error(404, f"No such File object: {fid}", "openai")
    if doc.get("endpoint") != "/v1/chat/completions" or doc.get("completion_window") != "24h":
        return _error(400, "endpoint must be /v1/chat/completions, completion_window 24h",
                      "openai")
    metadata = doc.get("metadata")
    requests, errors = _parse_input(state.files[fid][1], state.config.max_requests)
    b = _new(state, "openai", f"batch_{secrets.token_hex(12)}", requests, metadata)
    b.input_file_id = fid
    b.errors = errors or None
    if not errors:
        _start(state, b)
    await asyncio.sleep(state.config.create_delay)  # created: the answer may never arrive
    return web.json_response(_openai_batch(state, b))


def _new(state: BatchState, api: str, bid: str, requests: list[tuple[str, Any]],
         metadata: Any) -> SimBatch:
    now = time.time()
    b = SimBatch(bid, api, now, now + state.config.delay, requests,
                 metadata if isinstance(metadata, dict) else None)
    state.batches[bid] = b
    state.creates += 1
    return b


def _find(request: web.Request, api: str) -> SimBatch | None:
    b = request.app[BATCH].batches.get(request.match_info["batch_id"])
    return b if b is not None and b.api == api else None


async def get_openai(request: web.Request) -> web.Response:
    if (denied := _auth(request, "openai")) is not None:
        return denied
    b = _find(request, "openai")
    if b is None:
        return _error(404, "No such batch", "openai")
    return web.json_response(_openai_batch(request.app[BATCH], b))


async def list_openai(request: web.Request) -> web.Response:
    state = request.app[BATCH]
    found = [b for b in reversed(state.batches.values()) if b.api == "openai"]
    return _page(request, [_openai_batch(state, b) for b in found], "after", "openai")


def _page(request: web.Request, docs: list[dict[str, Any]], cursor: str, api: str
          ) -> web.Response:
    """Newest first, ``limit`` a page (default 20, at most 100), after the cursor id."""
    try:
        limit = min(100, max(1, int(request.query.get("limit", "20"))))
    except ValueError:
        return _error(400, "limit must be an integer", api)
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


async def cancel(request: web.Request) -> web.Response:
    api = "anthropic" if "/messages/" in request.path else "openai"
    if (denied := _auth(request, api)) is not None:
        return denied
    state, b = request.app[BATCH], _find(request, api)
    if b is None:
        return _error(404, "No such batch", api)
    if not b.ended and b.errors is None:
        b.cancelled = True
        b.answers = [Answer(cid) for cid, _ in b.requests]  # nothing ran before the cancel
        _finish(state, b)
    return web.json_response(_openai_batch(state, b) if api == "openai"
                             else _anthropic_batch(state, b, request))


# ---------------------------------------------------------------- Anthropic


def _anthropic_batch(state: BatchState, b: SimBatch, request: web.Request) -> dict[str, Any]:
    status = _status(state, b)
    ended = status in ("completed", "expired", "cancelled")
    c = _counts(b)
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
    if (denied := _auth(request, "anthropic")) is not None:
        return denied
    raw = await request.read()
    if len(raw) > state.config.max_bytes:
        return _error(413, f"Request exceeds the maximum size of {state.config.max_bytes} "
                           "bytes", "anthropic")
    try:
        items = json.loads(raw)["requests"]
        requests = [(r["custom_id"], r["params"]) for r in items]
    except (ValueError, KeyError, TypeError):
        return _error(400, "requests: a list of {custom_id, params} is required", "anthropic")
    ids = [cid for cid, _ in requests]
    if not requests or len(requests) > state.config.max_requests:
        return _error(400, f"requests: between 1 and {state.config.max_requests} items",
                      "anthropic")
    if len(set(ids)) != len(ids) or not all(isinstance(c, str) and _CUSTOM_ID.match(c)
                                            for c in ids):
        return _error(400, "custom_id must be unique and match ^[a-zA-Z0-9_-]{1,64}$",
                      "anthropic")
    b = _new(state, "anthropic", f"msgbatch_{secrets.token_hex(12)}", requests, None)
    _start(state, b)
    await asyncio.sleep(state.config.create_delay)
    return web.json_response(_anthropic_batch(state, b, request))


async def get_anthropic(request: web.Request) -> web.Response:
    if (denied := _auth(request, "anthropic")) is not None:
        return denied
    b = _find(request, "anthropic")
    if b is None:
        return _error(404, "No such batch", "anthropic")
    return web.json_response(_anthropic_batch(request.app[BATCH], b, request))


async def list_anthropic(request: web.Request) -> web.Response:
    state = request.app[BATCH]
    found = [b for b in reversed(state.batches.values()) if b.api == "anthropic"]
    return _page(request, [_anthropic_batch(state, b, request) for b in found], "after_id",
                 "anthropic")


async def results_anthropic(request: web.Request) -> web.StreamResponse:
    if (denied := _auth(request, "anthropic")) is not None:
        return denied
    state, b = request.app[BATCH], _find(request, "anthropic")
    if b is None:
        return _error(404, "No such batch", "anthropic")
    if _status(state, b) not in ("completed", "expired", "cancelled"):
        return _error(400, "the batch is still processing", "anthropic")
    lines = [anthropic_line(a, b.cancelled) for a in b.answers or []]
    return await _stream_lines(request, lines, state)


def install(app: web.Application, config: BatchConfig, seed: int, sim_config: Any) -> None:
    app[BATCH] = BatchState(config, seed, sim_config, rng=random.Random(seed + 1))
    r = app.router
    r.add_post("/v1/files", upload_file)
    r.add_get("/v1/files", list_files)
    r.add_get("/v1/files/{file_id}/content", file_content)
    r.add_post("/v1/batches", create_openai)
    r.add_get("/v1/batches", list_openai)
    r.add_get("/v1/batches/{batch_id}", get_openai)
    r.add_post("/v1/batches/{batch_id}/cancel", cancel)
    r.add_post("/v1/messages/batches", create_anthropic)
    r.add_get("/v1/messages/batches", list_anthropic)
    r.add_get("/v1/messages/batches/{batch_id}", get_anthropic)
    r.add_get("/v1/messages/batches/{batch_id}/results", results_anthropic)
    r.add_post("/v1/messages/batches/{batch_id}/cancel", cancel)


def add_arguments(add: Any) -> None:
    """``simulate --batch-*``: the batch APIs' scenario."""
    d = BatchConfig()
    add("--batch-delay", type=float, default=d.delay,
        help="seconds from create until a batch ends")
    add("--batch-fail-rate", type=float, default=d.fail_rate,
        help="fraction of batch requests that end as a server error (partial failure)")
    add("--batch-expire-rate", type=float, default=d.expire_rate,
        help="fraction of batch requests left unfinished: their batch expires")
    add("--batch-in-order", action="store_true", help="batch results in request order "
                                                      "(default: shuffled)")
    add("--batch-max-bytes", type=int, default=d.max_bytes,
        help="largest batch input file / create body; larger gets HTTP 413")


def config_from(args: Any) -> BatchConfig:
    return BatchConfig(delay=args.batch_delay, fail_rate=args.batch_fail_rate,
                       expire_rate=args.batch_expire_rate, in_order=args.batch_in_order,
                       max_bytes=args.batch_max_bytes)
