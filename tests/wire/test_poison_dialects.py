"""A value of the wrong type from a Responses or Gemini stream never stops the batch.

As tests/wire/test_poison_values.py does for chat completions: a real loopback server
sends the poison in real bytes, split every 7 bytes, for one row among healthy ones;
the run goes on, the poisoned row is ok with a clean value or an error row with a
reason, every other row is ok, and a rerun sends nothing (the row is done or its error
is permanent).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from fake_gateway import LoopbackServer, img

HEALTHY = [{"id": f"ok{i}", "image": img("ok", f"{i}.jpg")} for i in range(3)]
CAPTION = "A clean caption."


# ---------------------------------------------------------------- Responses events

def r_event(kind: str, n: int, **fields: Any) -> bytes:
    return (f"event: {kind}\ndata: "
            f"{json.dumps({'type': kind, 'sequence_number': n, **fields})}\n\n").encode()


def responses(delta: Any = CAPTION, status: Any = "completed", model: Any = "gpt-5",
              usage: Any = None, seq: Any = 2) -> bytes:
    usage = usage if usage is not None else {"input_tokens": 10, "output_tokens": 4}
    done = {"id": "resp_1", "object": "response", "status": status, "model": model,
            "usage": usage}
    return (r_event("response.created", 0, response={"id": "resp_1", "model": "gpt-5"})
            + r_event("response.output_text.delta", 1, delta=delta)
            + r_event("response.completed", seq, response=done))


# ---------------------------------------------------------------- Gemini chunks

def g_chunk(parts: Any = None, finish: Any = "STOP", usage: Any = None,
            candidates: Any = None, model: Any = "gemini-2.5-flash") -> bytes:
    candidate = {"content": {"parts": [{"text": CAPTION}] if parts is None else parts},
                 "finishReason": finish}
    doc = {"candidates": [candidate] if candidates is None else candidates,
           "modelVersion": model,
           "usageMetadata": usage or {"promptTokenCount": 10, "candidatesTokenCount": 4}}
    return f"data: {json.dumps(doc)}\n\n".encode()


POISONS: dict[str, tuple[str, bytes, str | None]] = {  # api, body, error class (None: ok)
    "responses-delta-number": ("responses", responses(delta=123), "bad_response"),
    "responses-status-number": ("responses", responses(status=7), "bad_response"),
    "responses-model-number": ("responses", responses(model=42), None),
    "responses-usage-text": ("responses", responses(usage={"input_tokens": "many"}), None),
    "responses-sequence-text": ("responses", responses(seq="two"), None),
    "gemini-finish-number": ("gemini", g_chunk(finish=7), "bad_response"),
    "gemini-candidates-text": ("gemini", g_chunk(candidates="none"), "bad_response"),
    "gemini-text-number": ("gemini", g_chunk(parts=[{"text": 5}]), "bad_response"),
    "gemini-args-list": ("gemini", g_chunk(parts=[{"functionCall": {"args": [1]}}]),
                         "bad_response"),
    "gemini-model-number": ("gemini", g_chunk(model=2.5), None),
    "gemini-usage-negative": ("gemini", g_chunk(usage={"promptTokenCount": -3}), None),
}


def _server(poison: bytes, healthy: bytes) -> LoopbackServer:
    async def handler(ex: Any) -> web.StreamResponse:
        body = poison if b"POISON" in ex.rec.raw else healthy
        return await ex.sse_response(body, chunk_size=7)
    return LoopbackServer(handler)


@pytest.fixture
def serve() -> Iterator[Callable[[bytes, bytes], LoopbackServer]]:
    servers: list[LoopbackServer] = []

    def start(poison: bytes, healthy: bytes) -> LoopbackServer:
        server = _server(poison, healthy)
        server.start()
        servers.append(server)
        return server
    yield start
    for s in servers:
        s.stop()


@pytest.mark.parametrize("name", sorted(POISONS))
def test_a_poisoned_value_costs_at_most_its_own_row(caption: Any, serve: Any,
                                                     name: str) -> None:
    api, body, cls = POISONS[name]
    server = serve(body, responses() if api == "responses" else g_chunk())
    root = server.origin + ("/v1beta" if api == "gemini" else "/v1")
    rows = [{"id": "poison", "image": img("POISON", f"{name}.jpg")}, *HEALTHY]
    first = caption(rows, "--api", api, base_url=root)
    assert first.code == (1 if cls else 0), first.stderr
    assert "Traceback" not in first.stderr
    row = first.row("poison")
    assert (row["status"], row["error_class"]) == ("error" if cls else "ok", cls)
    assert all(first.row(r["id"])["status"] == "ok" for r in HEALTHY)
    sent = server.count()
    again = caption(rows, "--api", api, base_url=root)
    assert again.code == 0 and server.count() == sent, "a rerun sends nothing"


def test_a_number_where_the_model_name_belongs_is_stored_as_its_text(caption: Any,
                                                                     serve: Any) -> None:
    server = serve(responses(model=42), responses())
    rows = [{"id": "poison", "image": img("POISON", "m.jpg")}]
    res = caption(rows, "--api", "responses", base_url=server.base_url)
    assert res.row("poison")["model"] == "42"
