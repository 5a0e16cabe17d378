"""A wrong --base-url stops the run within seconds, naming the URL and a hint.

Against real loopback servers: nothing listening, https against a plain-HTTP port, a
web server that answers 501 to POST, a URL without /v1 that answers 404. Each exits 3
with one line holding the full URL tried; OUT holds no error row; the same command with
the right URL then captions every row. (A wrong key: tests/wire/test_conformance.py C35.)
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from aiohttp import web
from fake_gateway import Exchange, LoopbackServer, img

from pipeline.wire.endpoint import LIMIT

ROWS = [{"id": f"r{i}", "image": img("ok", f"{i}.jpg")} for i in range(5)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _not_implemented(ex: Exchange) -> web.StreamResponse:
    return web.Response(status=501, text="<html><h1>501 Not Implemented</h1></html>",
                        content_type="text/html")


@pytest.mark.parametrize("case", ["nothing-listening", "https-on-http", "plain-501",
                                  "missing-v1"])
def test_a_wrong_endpoint_exits_3_at_once_naming_the_url(caption: Any, gateway: Any,
                                                         case: str) -> None:
    with LoopbackServer(_not_implemented) as plain:
        url, word = {
            "nothing-listening": (f"http://127.0.0.1:{_free_port()}/v1", "refused"),
            "https-on-http": (gateway.base_url.replace("http://", "https://"), "TLS"),
            "plain-501": (plain.origin + "/v1", "501"),
            "missing-v1": (gateway.base_url.removesuffix("/v1"), "404"),
        }[case]
        res = caption(ROWS, base_url=url, retries=5, concurrency=2)
        sent = {"plain-501": len(plain.requests()), "missing-v1": gateway.count()}.get(case)
    assert res.code == 3, res.stderr
    (line,) = res.stderr_lines()
    assert f"{url}/chat/completions" in line and word in line
    if sent is not None:  # LIMIT failures decide (one more may be on the wire), not
        assert sent <= LIMIT + 1, sent  # 5 rows × 6 attempts
    assert res.df.empty, "no error rows for a wrong endpoint"
    hint = {"nothing-listening": "is the server running", "https-on-http": "http://",
            "plain-501": "API root", "missing-v1": "/v1"}[case]
    assert hint in line

    again = caption(ROWS, retries=5)  # the same OUT, the right URL
    assert again.code == 0 and sorted(again.ids) == [f"r{i}" for i in range(5)]
