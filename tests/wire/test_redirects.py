"""Redirects over real TCP: which ones the API request follows, what reaches another
origin, and how image downloads (--fetch-urls) treat credentials on the way.

Each origin is its own loopback server (another port is another origin); every request
it receives is recorded, so "no credential reached it" is checked on the server side.
"""

from __future__ import annotations

import io
import json
import subprocess
from typing import Any

import pytest
from aiohttp import web
from conftest import API_KEY, REPO, caption_cmd, read_out, subprocess_env, write_manifest
from fake_gateway import Exchange, LoopbackServer, img
from PIL import Image

CAPTION = "A caption that came the long way."
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


def openai_stream() -> bytes:
    chunks = [{"id": "c1", "model": "m", "choices": [{"index": 0, "delta": d,
                                                      "finish_reason": f}]}
              for d, f in (({"role": "assistant", "content": ""}, None),
                           ({"content": CAPTION}, None), ({}, "stop"))]
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + \
        b"data: [DONE]\n\n"


def anthropic_stream() -> bytes:
    events = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "model": "claude", "usage": {"input_tokens": 10}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": CAPTION}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 7}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)


STREAMS = {"openai": openai_stream, "anthropic": anthropic_stream}


def answering(api: str) -> Any:
    async def handler(ex: Exchange) -> web.StreamResponse:
        return web.Response(body=STREAMS[api](), content_type="text/event-stream")
    return handler


def redirecting(status: int, location: str) -> Any:
    async def handler(ex: Exchange) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location}, text="moved")
    return handler


def credentials(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items()
            if k.lower() in ("authorization", "x-api-key", "api-key")}


ROWS = [{"id": "r1", "image": img("ok")}]


# --------------------------------------------------------------------------- API request


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("status", [307, 308])
def test_a_redirect_to_another_origin_stops_the_run_and_sends_it_nothing(caption, api,
                                                                         status):
    with LoopbackServer(answering(api)) as other, \
            LoopbackServer(redirecting(status, "")) as endpoint:
        target = other.origin + PATHS[api]
        endpoint.handler = redirecting(status, target)
        res = caption(ROWS, "--api", api, base_url=endpoint.origin + "/v1")
        assert res.code == 3, res.stderr
        assert [r.path for r in endpoint.requests()] == [PATHS[api]]
        assert credentials(endpoint.requests()[0].headers), "precondition: the key was sent"
        assert other.requests() == []  # not a credential, not even a request
    line, = res.stderr_lines()
    assert f"redirects to {target} (HTTP {status})" in line
    assert f"use {other.origin}/v1 as --base-url" in line
    assert read_out(res.out).empty  # nothing was captioned, nothing is marked done


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("status", [307, 308])
def test_a_same_origin_307_or_308_is_followed_with_body_and_credentials(caption, api,
                                                                        status):
    async def handler(ex: Exchange) -> web.StreamResponse:
        if ex.request.path.startswith("/v1/"):
            return web.Response(status=status, headers={"Location": "/v2" + ex.request.path[3:]})
        return await answering(api)(ex)

    with LoopbackServer(handler) as endpoint:
        res = caption(ROWS, "--api", api, base_url=endpoint.origin + "/v1")
        first, second = endpoint.requests()
    assert res.code == 0, res.stderr
    assert res.row("r1")["caption"] == CAPTION
    assert (first.method, second.method) == ("POST", "POST")
    assert second.path == "/v2" + PATHS[api][3:]
    assert second.raw == first.raw and second.json()["model"]
    assert credentials(second.headers) == credentials(first.headers) != {}
    assert API_KEY in "".join(credentials(second.headers).values())


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_301_302_or_303_on_the_post_stops_the_run_naming_the_target(caption, status):
    with LoopbackServer(redirecting(status, "")) as endpoint:
        endpoint.handler = redirecting(status, endpoint.origin + "/api/v1/chat/completions")
        res = caption(ROWS + [{"id": "r2", "image": img("ok", "b.jpg")}],
                      base_url=endpoint.origin + "/v1", concurrency=1)
        methods = [r.method for r in endpoint.requests()]
    assert res.code == 3, res.stderr
    assert methods == ["POST"]  # never resent as a GET
    line, = res.stderr_lines()
    assert f"redirects to {endpoint.origin}/api/v1/chat/completions (HTTP {status})" in line
    assert f"use {endpoint.origin}/api/v1 as --base-url" in line


def test_a_301_on_the_post_exits_3_with_one_line_from_the_command(tmp_path):
    with LoopbackServer(redirecting(301, "")) as endpoint:
        target = "https://api.example.invalid/v1/chat/completions"
        endpoint.handler = redirecting(301, target)
        manifest = write_manifest(tmp_path / "m.csv", ROWS)
        proc = subprocess.run(caption_cmd(manifest, tmp_path / "out", endpoint.origin + "/v1"),
                              cwd=REPO, env=subprocess_env(), capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert err.strip().splitlines() == [
        f"error: the endpoint redirects to {target} (HTTP 301); use "
        "https://api.example.invalid/v1 as --base-url"]


def test_a_same_origin_redirect_loop_stops_the_run(caption):
    async def handler(ex: Exchange) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": ex.request.path})

    with LoopbackServer(handler) as endpoint:
        res = caption(ROWS, base_url=endpoint.origin + "/v1")
        hops = len(endpoint.requests())
    assert res.code == 3, res.stderr
    assert "redirects more than 5 times" in res.stderr_lines()[0]
    assert hops == 6


def test_a_redirect_without_location_stops_the_run(caption):
    async def handler(ex: Exchange) -> web.StreamResponse:
        return web.Response(status=302)

    with LoopbackServer(handler) as endpoint:
        res = caption(ROWS, base_url=endpoint.origin + "/v1")
    assert res.code == 3, res.stderr
    assert "HTTP 302 without a Location" in res.stderr_lines()[0]


# --------------------------------------------------------------------------- downloads


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


def image_host() -> Any:
    async def handler(ex: Exchange) -> web.StreamResponse:
        return web.Response(body=jpeg(), content_type="image/jpeg")
    return handler


def test_download_redirects_are_followed_without_user_info_or_api_key(caption, gateway):
    with LoopbackServer(image_host()) as cdn, LoopbackServer(redirecting(302, "")) as site:
        # the site sends the client on, with credentials of its own in the Location
        site.handler = redirecting(302, f"http://evil:stolen@127.0.0.1:{cdn.port}/x.jpg")
        url = f"http://alice:pw-for-site@127.0.0.1:{site.port}/a.jpg"
        res = caption([{"id": "r1", "image": url}], "--fetch-urls")
        site_seen, cdn_seen = site.requests(), cdn.requests()
    assert res.code == 0, res.stderr
    assert res.row("r1")["image"] == url  # the manifest's value, as given
    assert gateway.calls()[0].url.startswith("data:image/jpeg;base64,")
    # the user's credentials go to the host they were written for, and nowhere else
    assert site_seen[0].headers.get("Authorization", "").startswith("Basic ")
    assert [s.path for s in cdn_seen] == ["/x.jpg"]
    assert credentials(cdn_seen[0].headers) == {}
    for seen in site_seen + cdn_seen:
        assert API_KEY not in json.dumps(seen.headers)


def test_a_download_error_names_the_url_without_its_password(caption):
    async def missing(ex: Exchange) -> web.StreamResponse:
        return web.Response(status=404)

    with LoopbackServer(missing) as site:
        url = f"http://alice:hunter2-pass@127.0.0.1:{site.port}/gone.jpg"
        res = caption([{"id": "r1", "image": url}], "--fetch-urls")
    assert res.code == 1, res.stderr
    row = res.row("r1")
    assert row["error_class"] == "bad_image"
    assert f"http://alice:***@127.0.0.1:{site.port}/gone.jpg" in row["error"]
    runs = [p.read_text() for p in (res.out / "_runs").glob("*.json")]
    assert runs and not any("hunter2-pass" in text for text in runs)
    assert "hunter2-pass" not in res.stderr + res.stdout


def test_a_download_redirect_loop_is_a_bad_image_row(caption):
    async def loop(ex: Exchange) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": ex.request.path})

    with LoopbackServer(loop) as site:
        res = caption([{"id": "r1", "image": site.origin + "/a.jpg"}], "--fetch-urls")
    assert res.code == 1, res.stderr
    assert "redirected more than 10 times" in res.row("r1")["error"]


def test_a_download_redirect_to_another_scheme_is_a_bad_image_row(caption):
    with LoopbackServer(redirecting(302, "file:///etc/passwd")) as site:
        res = caption([{"id": "r1", "image": site.origin + "/a.jpg"}], "--fetch-urls")
    assert res.code == 1, res.stderr
    assert res.row("r1")["error_class"] == "bad_image"
    assert "unusable location 'file:///etc/passwd'" in res.row("r1")["error"]


@pytest.mark.parametrize("url", ["http://[invalid/a.jpg", "http://h:99999/a.jpg",
                                 "http:///a.jpg"])
def test_an_image_url_that_cannot_be_parsed_is_a_bad_input_row(caption, gateway, url):
    res = caption([{"id": "r1", "image": url}], "--fetch-urls")
    assert res.code == 1, res.stderr
    assert res.row("r1")["error_class"] == "bad_input"
    assert "invalid image URL" in res.row("r1")["error"]
    assert gateway.count() == 0
