"""The simulator's OpenAI Files + Batches routes (docs/protocol.md §17.1)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from aiohttp import BodyPartReader, web

from .batch_state import (
    BATCH,
    COMPLETION_WINDOW,
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
    store_file,
    stream_lines,
)


def _openai_batch(state: BatchState, b: SimBatch) -> dict[str, Any]:
    status = status_now(state, b)
    c = result_counts(b)
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
    if (denied := refuse_key(request, "openai")) is not None:
        return denied
    await asyncio.sleep(state.config.upload_hold)  # not stored yet: a kill loses it
    reader = await request.multipart()
    purpose, name, data = None, "upload.jsonl", b""
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            return error_answer(400, "a nested multipart body is not a batch upload", "openai")
        if part.name == "purpose":
            purpose = (await part.text()).strip()
        elif part.name == "file":
            name = part.filename or name
            data = bytes(await part.read())
    if purpose != "batch":
        return error_answer(400, "purpose must be 'batch'", "openai")
    if len(data) > state.config.max_bytes:
        return error_answer(413, f"The file is {len(data)} bytes; the batch input limit is "
                           f"{state.config.max_bytes} bytes", "openai")
    fid = store_file(state, name, data)
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
    if (denied := refuse_key(request, "openai")) is not None:
        return denied
    found = state.files.get(request.match_info["file_id"])
    if found is None:
        return error_answer(404, "No such File object", "openai")
    return await stream_lines(request, found[1].splitlines(keepends=True), state)


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
    if (denied := refuse_key(request, "openai")) is not None:
        return denied
    try:
        doc = await request.json()
        fid = doc["input_file_id"]
    except (ValueError, KeyError, TypeError):
        return error_answer(400, "input_file_id is required", "openai")
    if fid not in state.files:
        return error_answer(404, f"No such File object: {fid}", "openai")
    if doc.get("endpoint") != "/v1/chat/completions" or doc.get("completion_window") != "24h":
        return error_answer(400, "endpoint must be /v1/chat/completions, completion_window 24h",
                      "openai")
    metadata = doc.get("metadata")
    requests, errors = _parse_input(state.files[fid][1], state.config.max_requests)
    b = new_batch(state, "openai", f"batch_{secrets.token_hex(12)}", requests, metadata)
    b.input_file_id = fid
    b.errors = errors or None
    if not errors:
        start_work(state, b)
    await asyncio.sleep(state.config.create_delay)  # created: the answer may never arrive
    return web.json_response(_openai_batch(state, b))


async def get_openai(request: web.Request) -> web.Response:
    if (denied := refuse_key(request, "openai")) is not None:
        return denied
    b = find_batch(request, "openai")
    if b is None:
        return error_answer(404, "No such batch", "openai")
    return web.json_response(_openai_batch(request.app[BATCH], b))


async def list_openai(request: web.Request) -> web.Response:
    state = request.app[BATCH]
    found = [b for b in reversed(state.batches.values()) if b.api == "openai"]
    return list_page(request, [_openai_batch(state, b) for b in found], "after", "openai")



async def cancel_openai(request: web.Request) -> web.Response:
    if (denied := refuse_key(request, "openai")) is not None:
        return denied
    state, b = request.app[BATCH], find_batch(request, "openai")
    if b is None:
        return error_answer(404, "No such batch", "openai")
    cancel_batch(state, b)
    return web.json_response(_openai_batch(state, b))
