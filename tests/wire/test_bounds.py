"""Bounds on what a server can make the client hold or wait for, over real TCP: an
endless SSE line, an endless stream, a trickle that never ends, big JSON completions,
a JSON completion labelled as an event stream, and stale keep-alive connections.

Memory is measured on a real subprocess (its peak RSS from ``wait4``); the rest runs
the client in-process against the fake gateway with scenarios scripted here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest
from conftest import REPO, SAMPLES, caption_cmd, read_out, subprocess_env, write_manifest
from fake_gateway import MODEL, Ctx, chunk, img, sse, standard_events, stream_body

MiB = 1024 * 1024
SERVER_MAX = 256 * MiB  # what one endless response may push at most (the test's own bound)


def one(scenario: str, **query: object) -> list[dict]:
    return [{"id": "r1", "image": img(scenario, **query)}]


def endless(prefix: bytes, piece: bytes, sent: list[int]) -> Any:
    """A 200 stream that writes ``prefix`` then ``piece`` until the client hangs up."""
    async def handler(ctx: Ctx) -> Any:
        resp = await ctx.start_stream()
        await resp.write(prefix)
        total = 0
        sent.append(0)
        try:
            while total < SERVER_MAX and not ctx.gw.stopping:
                await resp.write(piece)
                total += len(piece)
                sent[-1] = total
        except (ConnectionError, RuntimeError):
            pass  # the client closed the connection: what this test wants
        return resp
    return handler


LINE_START = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"'


def peak_rss_mb(cmd: list[str], timeout: float = 60) -> tuple[int, float, str]:
    """Run ``cmd``; its exit code, peak RSS in MB and stderr."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            pytest.fail("the run did not end on its own")
        time.sleep(0.05)
    err = proc.stderr.read().decode() if proc.stderr else ""
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, err


# --------------------------------------------------------------------------- endless lines


def test_an_endless_sse_line_fails_the_attempt_and_is_retried(caption, gateway):
    sent: list[int] = []
    gateway.on("endless", endless(LINE_START, b"x" * 65536, sent))
    res = caption(one("endless"), "--max-line-bytes", "200000", retries=2)
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert (r["error_class"], r["attempts"]) == ("stream_broken", 3)
    assert "longer than 200000 bytes" in r["error"]
    assert len(sent) == 3 and min(sent) >= 200000  # each attempt was cut at the cap


@pytest.mark.slow
def test_an_endless_sse_line_keeps_memory_flat(gateway, tmp_path):
    sent: list[int] = []
    gateway.on("endless", endless(LINE_START, b"x" * 65536, sent))
    manifest = write_manifest(tmp_path / "m.csv", one("endless"))
    code, peak, err = peak_rss_mb(caption_cmd(manifest, tmp_path / "out", gateway.base_url,
                                              "--retries", "2"))
    baseline_manifest = write_manifest(tmp_path / "b.csv", one("ok"))
    _, baseline, _ = peak_rss_mb(caption_cmd(baseline_manifest, tmp_path / "b",
                                             gateway.base_url))
    assert code == 1, err
    df = read_out(tmp_path / "out")
    assert df["error_class"].tolist() == ["stream_broken"]
    assert len(sent) == 3
    print(f"\npeak RSS: endless line {peak:.0f} MB, one ordinary row {baseline:.0f} MB; "
          f"the server pushed {sum(sent) / MiB:.1f} MiB")
    assert peak < baseline + 64, f"peak RSS {peak:.0f} MB vs {baseline:.0f} MB for one row"


def test_a_stream_that_never_finishes_stops_at_the_response_cap(caption, gateway):
    sent: list[int] = []
    piece = sse(chunk("more and more text "))
    gateway.on("forever", endless(sse(chunk("", role=True)), piece * 64, sent))
    res = caption(one("forever"), "--max-response-bytes", "300000", retries=1)
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert (r["error_class"], r["attempts"]) == ("stream_broken", 2)
    assert "larger than 300000 bytes (--max-response-bytes)" in r["error"]
    assert not r["caption"]


def test_a_trickle_that_never_ends_is_cut_by_the_attempt_timeout(caption, gateway):
    async def trickle(ctx: Ctx) -> Any:
        resp = await ctx.start_stream()
        await resp.write(sse(chunk("", role=True)))
        while not ctx.gw.stopping:  # a comment well within the idle timeout, forever
            await resp.write(b": still working\n\n")
            await asyncio.sleep(0.05)
        return resp

    gateway.on("trickle", trickle)
    res = caption(one("trickle"), "--attempt-timeout", "0.4", retries=1)
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert (r["error_class"], r["attempts"]) == ("timeout", 2)
    assert "longer than 0.4 s (--attempt-timeout)" in r["error"]
    assert gateway.count() == 2


# --------------------------------------------------------------------------- JSON bodies


def completion(text: str) -> dict:
    return {"id": "chatcmpl-big", "object": "chat.completion", "created": 1767225600,
            "model": MODEL, "choices": [{"index": 0, "message": {
                "role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


BIG_TEXT = "A very long caption. " * 100_000  # 2.1 MB


def test_a_2_mb_non_streamed_completion_is_ok(caption, gateway):
    gateway.on("big", lambda ctx: ctx.json_response(200, completion(BIG_TEXT)))
    res = caption(one("big"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["caption"] == BIG_TEXT and r["terminal"] == "json"


def test_a_json_completion_over_the_response_cap_fails_as_broken(caption, gateway):
    gateway.on("big", lambda ctx: ctx.json_response(200, completion(BIG_TEXT)))
    res = caption(one("big"), "--max-response-bytes", "1000000", retries=0)
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert r["error_class"] == "stream_broken"
    assert "JSON response is larger than 1000000 bytes" in r["error"]


def test_a_2_mb_error_body_is_read_only_to_its_small_cap(caption, gateway):
    body = {"error": {"message": "Invalid image.", "type": "invalid_request_error"},
            "padding": "x" * 2_000_000}
    gateway.on("bigerror", lambda ctx: ctx.json_response(400, body))
    res = caption(one("bigerror"))
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert r["error_class"] == "bad_image" and r["attempts"] == 1
    assert len(r["error"]) < 400  # an excerpt of the first 64 KiB, not the page


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_completion_sent_as_event_stream_is_read_as_a_completion(caption, gateway,
                                                                        indent):
    raw = json.dumps(completion("A cat on a sill."), indent=indent).encode()
    gateway.on("mislabelled", lambda ctx: ctx.sse_response([b"\n", raw]))
    res = caption(one("mislabelled"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert (r["caption"], r["terminal"], r["attempts"]) == ("A cat on a sill.", "json", 1)
    assert json.loads(r["quirks"]) == {"json_body_as_event_stream": 1}


def test_a_json_error_sent_as_event_stream_is_classified_and_retried(caption, gateway):
    async def handler(ctx: Ctx) -> Any:
        if ctx.attempt == 1:
            return await ctx.sse_response(json.dumps({"error": {
                "message": "upstream overloaded", "type": "server_error"}}).encode())
        return await ctx.ok("Second time lucky.")

    gateway.on("mislabelled", handler)
    res = caption(one("mislabelled"))
    assert res.code == 0, res.stderr
    assert (res.row("r1")["caption"], res.row("r1")["attempts"]) == ("Second time lucky.", 2)


def test_a_bare_json_error_after_sse_events_is_still_an_error(caption, gateway):
    bare = json.dumps({"error": {"message": "upstream error", "type": "x"}}).encode()
    body = b"".join(sse(e) for e in standard_events(["Partial"])[:2]) + bare + b"\n"
    gateway.on("c24like", lambda ctx: ctx.sse_response(body))
    res = caption(one("c24like"), retries=0)
    assert res.row("r1")["error_class"] == "stream_error"
    assert "upstream error" in res.row("r1")["error"]


# --------------------------------------------------------------------------- keep-alive


def dropping_reused(drops: list[int], every: bool = False) -> Any:
    """A server that closes a connection, unanswered, when a second request arrives on
    it (the idle-close race, made deterministic); ``every``: drops every request."""
    served: dict[int, int] = {}
    keep: list[Any] = []  # connections stay referenced so their ids stay unique

    async def handler(ctx: Ctx) -> Any:
        transport = ctx.request.transport
        keep.append(transport)
        served[id(transport)] = served.get(id(transport), 0) + 1
        if every or served[id(transport)] > 1:
            drops.append(1)
            transport.close()
            await asyncio.sleep(5)  # cancelled when the connection is gone
        return await ctx.sse_response(stream_body([f"Caption of {ctx.url}"]))
    return handler


def test_stale_keep_alive_connections_cost_no_attempt(caption, gateway):
    drops: list[int] = []
    gateway.on("keepalive", dropping_reused(drops))
    rows = [{"id": f"r{i:02d}", "image": img("keepalive", f"{i:02d}.jpg")} for i in range(20)]
    res = caption(rows, retries=0, concurrency=4)
    assert res.code == 0, res.stderr
    assert len(res.df) == 20 and (res.df["status"] == "ok").all()
    assert (res.df["attempts"] == 1).all()
    assert drops, "precondition: the server dropped reused connections"
    assert gateway.count() == 20 + len(drops)  # one free resend per dropped request


def test_a_failure_on_a_fresh_connection_counts_as_an_attempt(caption, gateway):
    drops: list[int] = []
    gateway.on("keepalive", dropping_reused(drops, every=True))
    rows = [{"id": f"r{i}", "image": img("keepalive", f"{i}.jpg")} for i in range(3)]
    res = caption(rows, retries=1, concurrency=1)
    assert res.code == 1, res.stderr
    assert (res.df["error_class"] == "connection").all()
    assert (res.df["attempts"] == 2).all()
    assert gateway.count() == 6  # nothing resent for free: no connection was reused


# --------------------------------------------------------------------------- local reads


def test_a_hung_image_read_is_a_bad_image_row_and_the_run_ends(caption, gateway, tmp_path,
                                                               monkeypatch):
    import pipeline.images.load

    release = threading.Event()
    real = pipeline.images.load.read_file

    def read(path: Any, max_bytes: int) -> bytes:
        if path.name.startswith("hung"):
            release.wait()  # as a read on a dead network mount
        return real(path, max_bytes)

    monkeypatch.setattr(pipeline.images.load, "read_file", read)
    shutil.copy(SAMPLES / "horse.png", tmp_path / "fine.png")
    rows = [{"id": "hung1", "image": "hung1.png"}, {"id": "hung2", "image": "hung2.png"},
            {"id": "fine", "image": "fine.png"}, {"id": "url", "image": img("ok")}]
    try:
        res = caption(rows, "--image-timeout", "0.3", concurrency=4)
    finally:
        release.set()
    assert res.code == 1, res.stderr
    df = res.df.set_index("id")
    assert df.loc["fine", "status"] == "ok" and df.loc["url", "status"] == "ok"
    for hung in ("hung1", "hung2"):
        assert df.loc[hung, "error_class"] == "bad_image"
        assert "took longer than 0.3 s (--image-timeout" in df.loc[hung, "error"]


@pytest.mark.parametrize("ctype", ["application/json", "text/event-stream"])
def test_a_json_completion_of_an_impossible_shape_fails_its_row_for_good(caption, gateway,
                                                                         ctype):
    doc = {"id": "x", "object": "chat.completion", "choices": [None]}
    gateway.on("shape", lambda ctx: ctx.json_response(200, doc, content_type=ctype))
    res = caption(one("shape"), retries=1)
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert (r["error_class"], r["attempts"]) == ("bad_response", 1)
    assert "a choice is NoneType" in r["error"]


def test_a_nul_byte_in_an_image_path_is_a_bad_input_row(caption, gateway, tmp_path):
    manifest = tmp_path / "nul.csv"
    manifest.write_bytes(b"id,image\nr1,a\x00b.png\nr2," + img("ok").encode() + b"\n")
    res = caption(manifest)
    assert res.code == 1, res.stderr
    assert (res.row("r1")["error_class"], res.row("r2")["status"]) == ("bad_input", "ok")
    assert res.row("r1")["error"] == "image reference contains a NUL byte: 'a\\x00b.png'"
    assert "Traceback" not in res.stderr
