"""The batch lane's wire behaviour against real servers on 127.0.0.1: result files read
line by line within a cap, credentials kept to the endpoint's origin, 413 as "split",
a lost create answer looked up before a second create; and the simulator's batch APIs
(files, batches, states, output and error files, results stream, faults, counters)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fake_gateway import Exchange, LoopbackServer

from pipeline.batch.ledger import Entry
from pipeline.batch.providers import OpenAIBatches, TooLarge
from pipeline.errors import RunFatal
from pipeline.pacing.retry import RetryPolicy
from pipeline.simulator.app import INVALID_KEY, SimConfig, start
from pipeline.simulator.batch import BATCH, BatchConfig
from pipeline.simulator.batch import INVALID_KEY as BATCH_INVALID_KEY
from pipeline.wire.transport import Transport

POLICY = RetryPolicy(2, 0.0, 0.0, 1.0)


def _api(t: Transport, line_cap: int = 1 << 20) -> OpenAIBatches:
    return OpenAIBatches(t, POLICY, line_cap)


async def _lines(server: LoopbackServer, line_cap: int) -> list[bytes]:
    async with Transport(server.origin + "/v1", {"Authorization": "Bearer k"}, 2, 5, 5) as t:
        return [x async for x in _api(t, line_cap).lines("/files/f/content")]


def test_a_result_line_over_the_cap_is_skipped_whole_and_the_rest_is_read() -> None:
    async def handler(ex: Exchange) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(ex.request)
        for piece in (b'{"a":1}\n{"big":"', b"x" * 5000, b'"}\n{"b"', b":2}\n{\"c\":3}"):
            await resp.write(piece)  # lines cut across chunks; the last has no newline
        return resp

    with LoopbackServer(handler) as server:
        got = asyncio.run(_lines(server, line_cap=1000))
    assert got == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


def test_a_results_url_on_another_origin_gets_no_credentials() -> None:
    async def handler(ex: Exchange) -> web.Response:
        return web.Response(text="{}\n")

    async def go(origin: str) -> None:
        async with Transport("http://127.0.0.1:1/v1", {"x-api-key": "k"}, 2, 5, 5) as t:
            async for _ in _api(t).lines("", url=origin + "/results"):
                pass

    with LoopbackServer(handler) as other:
        with pytest.raises(RunFatal, match="refusing to send credentials"):
            asyncio.run(go(other.origin))
        assert other.requests() == []


def test_an_upload_refused_as_too_large_is_reported_for_splitting(tmp_path: Any) -> None:
    async def handler(ex: Exchange) -> web.Response:
        return web.json_response({"error": {"message": "too big"}}, status=413)

    path = tmp_path / "r.jsonl"
    path.write_bytes(b"{}\n")

    async def go(base: str) -> None:
        async with Transport(base, {}, 2, 5, 5) as t:
            await _api(t).upload(Entry("cpa", "openai", "m", "r", sha256="0" * 64), path)

    with LoopbackServer(handler) as server:
        with pytest.raises(TooLarge):
            asyncio.run(go(server.origin + "/v1"))
        [seen] = server.requests()
        assert seen.path == "/v1/files" and b'name="purpose"' in seen.raw


# ---------------------------------------------------------------- the simulator


class _Client:
    def __init__(self, session: aiohttp.ClientSession, base: str, key: str = "sk-x") -> None:
        self.s, self.base = session, base
        self.h = {"Authorization": f"Bearer {key}", "x-api-key": key}

    async def json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.s.request(method, self.base + path, headers=self.h, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def text(self, path: str) -> str:
        async with self.s.get(self.base + path, headers=self.h) as r:
            return await r.text()


def _request(i: int, model: str = "m") -> dict[str, Any]:
    return {"model": model, "max_tokens": 50,
            "messages": [{"role": "user", "content": f"describe {i}"}]}


async def _with_sim(batch: BatchConfig, body: Any) -> Any:
    runner, port = await start(SimConfig(latency=0, tokens_per_second=0, batch=batch))
    try:
        async with aiohttp.ClientSession() as session:
            return await body(_Client(session, f"http://127.0.0.1:{port}/v1"), runner.app)
    finally:
        await runner.cleanup()


async def _openai_batch(c: _Client, lines: list[dict[str, Any]]) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", "".join(json.dumps(x) + "\n" for x in lines).encode(),
                   filename="in.jsonl")
    status, f = await c.json("POST", "/files", data=form)
    assert status == 200, f
    return await c.json("POST", "/batches", json={
        "input_file_id": f["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h", "metadata": {"k": "v"}})


async def _until_ended(c: _Client, path: str, field: str, ended: tuple[str, ...]) -> Any:
    for _ in range(200):
        _, b = await c.json("GET", path)
        if b[field] in ended:
            return b
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} never ended")


def test_an_openai_batch_answers_every_request_into_output_and_error_files() -> None:
    async def body(c: _Client, app: web.Application) -> None:
        lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": _request(i)} for i in range(20)]
        lines[3]["body"]["messages"][0]["content"] = [  # not an image: 400, in the error file
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
        status, b = await _openai_batch(c, lines)
        assert status == 200 and b["status"] in ("validating", "in_progress")
        b = await _until_ended(c, f"/batches/{b['id']}", "status", ("completed",))
        assert b["metadata"] == {"k": "v"} and b["request_counts"]["total"] == 20
        out = [json.loads(x) for x in (await c.text(
            f"/files/{b['output_file_id']}/content")).splitlines()]
        err = [json.loads(x) for x in (await c.text(
            f"/files/{b['error_file_id']}/content")).splitlines()]
        assert sorted(x["custom_id"] for x in out) == sorted(f"c{i}" for i in range(20)
                                                             if i != 3)
        assert [x["custom_id"] for x in out] != [f"c{i}" for i in range(20) if i != 3]
        assert out[0]["response"]["body"]["choices"][0]["message"]["content"]
        assert [(x["custom_id"], x["response"]["status_code"]) for x in err] == [("c3", 400)]
        assert app[BATCH].creates == 1

    asyncio.run(_with_sim(BatchConfig(), body))


def test_an_openai_batch_with_unfinished_requests_expires_with_what_finished() -> None:
    async def body(c: _Client, app: web.Application) -> None:
        lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": _request(i)} for i in range(30)]
        _, b = await _openai_batch(c, lines)
        b = await _until_ended(c, f"/batches/{b['id']}", "status", ("expired",))
        err = [json.loads(x) for x in (await c.text(
            f"/files/{b['error_file_id']}/content")).splitlines()]
        codes = {x["error"]["code"] if x["error"] else x["response"]["status_code"]
                 for x in err}
        assert codes <= {"batch_expired", 500} and "batch_expired" in codes
        assert b["output_file_id"] is not None

    asyncio.run(_with_sim(BatchConfig(fail_rate=0.2, expire_rate=0.3, in_order=True), body))


def test_an_openai_file_with_two_models_fails_validation() -> None:
    async def body(c: _Client, app: web.Application) -> None:
        lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": _request(i, model=f"m{i}")} for i in range(2)]
        _, b = await _openai_batch(c, lines)
        assert b["status"] == "failed" and b["errors"]["data"][0]["code"] == "mixed_models"

    asyncio.run(_with_sim(BatchConfig(), body))


def test_an_anthropic_batch_streams_its_results_after_it_ends() -> None:
    async def body(c: _Client, app: web.Application) -> None:
        reqs = [{"custom_id": f"c{i}", "params": _request(i)} for i in range(10)]
        status, b = await c.json("POST", "/messages/batches", json={"requests": reqs})
        assert status == 200 and b["processing_status"] == "in_progress"
        assert b["results_url"] is None
        b = await _until_ended(c, f"/messages/batches/{b['id']}", "processing_status",
                               ("ended",))
        assert b["request_counts"]["succeeded"] == 10
        results = [json.loads(x) for x in (await c.text(
            b["results_url"].split("/v1", 1)[1])).splitlines()]
        assert sorted(r["custom_id"] for r in results) == sorted(f"c{i}" for i in range(10))
        assert {r["result"]["type"] for r in results} == {"succeeded"}
        _, page = await c.json("GET", "/messages/batches?limit=1")
        assert [x["id"] for x in page["data"]] == [b["id"]] and page["has_more"] is False

    asyncio.run(_with_sim(BatchConfig(delay=0.05), body))


@pytest.mark.parametrize("cid", ["", "x" * 65, "has space", "ok"])
def test_an_anthropic_custom_id_must_be_1_to_64_safe_characters(cid: str) -> None:
    async def body(c: _Client, app: web.Application) -> None:
        reqs = [{"custom_id": cid, "params": _request(0)}]
        if cid == "ok":
            reqs.append({"custom_id": "ok", "params": _request(1)})  # not unique
        status, b = await c.json("POST", "/messages/batches", json={"requests": reqs})
        assert status == 400 and b["error"]["type"] == "invalid_request_error"
        assert app[BATCH].creates == 0

    asyncio.run(_with_sim(BatchConfig(), body))


def test_bodies_over_the_cap_get_413_and_the_invalid_key_401() -> None:
    async def body(c: _Client, app: web.Application) -> None:
        reqs = [{"custom_id": f"c{i}", "params": _request(i)} for i in range(50)]
        status, b = await c.json("POST", "/messages/batches", json={"requests": reqs})
        assert status == 413 and b["error"]["type"] == "request_too_large"
        bad = _Client(c.s, c.base, INVALID_KEY)
        status, _ = await bad.json("POST", "/messages/batches", json={"requests": reqs[:1]})
        assert status == 401 and app[BATCH].creates == 0

    assert BATCH_INVALID_KEY == INVALID_KEY
    asyncio.run(_with_sim(BatchConfig(max_bytes=2000), body))


def test_a_cancelled_batch_ends_with_every_request_canceled() -> None:
    async def body(c: _Client, app: web.Application) -> None:
        reqs = [{"custom_id": f"c{i}", "params": _request(i)} for i in range(3)]
        _, b = await c.json("POST", "/messages/batches", json={"requests": reqs})
        _, b = await c.json("POST", f"/messages/batches/{b['id']}/cancel")
        assert b["processing_status"] == "ended" and b["request_counts"]["canceled"] == 3
        results = (await c.text(b["results_url"].split("/v1", 1)[1])).splitlines()
        assert {json.loads(r)["result"]["type"] for r in results} == {"canceled"}

    asyncio.run(_with_sim(BatchConfig(delay=30), body))
