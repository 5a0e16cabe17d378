"""Fault behaviour over real TCP: rate limits, server errors, broken streams, bad input
rows, resume and --retry-errors. The client runs in-process (``caption`` fixture)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import REPO, SAMPLES, caption_cmd, subprocess_env, write_manifest
from fake_gateway import LOCAL_CAPTION, PARTIAL, RETRY_CAPTION, default_caption, img


def one(scenario: str, **query: object) -> list[dict]:
    return [{"id": "r1", "image": img(scenario, **query)}]


# --------------------------------------------------------------------------- 429: a pause ends
# (The pool-wide pause itself: tests/unit/test_worker.py at the seam, and
# tests/wire/test_conformance.py::test_c28_retry_after_pauses_the_whole_pool.)


def test_one_early_429_does_not_throttle_the_rest_of_the_run(gateway, tmp_path):
    """A pause is temporary: after one 429 with Retry-After: 1 the server accepts
    everything, so 16 short requests must finish well within 15 s (>= ~1 req/s)."""
    rows = [{"id": "limited", "image": img("C28", ra=1)}] + [
        {"id": f"n{i:02d}", "image": img("ok", f"n{i:02d}.jpg")} for i in range(15)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    cmd = caption_cmd(manifest, tmp_path / "out", gateway.base_url, "--concurrency", "4")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                              timeout=15)
    except subprocess.TimeoutExpired:
        served = gateway.count()
        pytest.fail(f"only {served} requests in 15 s after one 429 (Retry-After: 1); "
                    f"the pool stayed throttled after the pause")
    assert proc.returncode == 0, proc.stderr
    assert gateway.count() == 17


# --------------------------------------------------------------------------- server errors


def test_529s_do_not_use_up_the_retries_and_end_at_the_rate_wait_bound(caption, gateway):
    res = caption(one("s529"), "--max-rate-wait", "0.3")  # retries=2: 3 attempts if counted
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert r["status"] == "error" and r["error_class"] == "overloaded"
    assert r["http_status"] == 529 and "--max-rate-wait 0.3" in r["error"]
    assert r["attempts"] > 3 and gateway.count() == r["attempts"]
    assert not r["caption"]


def test_529_then_success(caption, gateway):
    res = caption(one("s529", fail=1))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["status"] == "ok" and r["caption"] == RETRY_CAPTION and r["attempts"] == 2


def test_503_html_body_is_reduced_to_a_readable_message(caption, gateway):
    res = caption(one("html503"))
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert r["status"] == "error" and r["error_class"] == "server"
    assert r["http_status"] == 503
    assert r["attempts"] == 3 and gateway.count() == 3
    assert "503" in r["error"]
    assert "<html" not in r["error"].lower() and "<!--" not in r["error"]
    assert len(r["error"]) < 1000


def test_500_json_body_exhausted(caption, gateway):
    res = caption(one("s500"), retries=1)
    assert res.code == 1
    r = res.row("r1")
    assert r["error_class"] == "server" and r["attempts"] == 2 and r["http_status"] == 500
    assert "The server had an error" in r["error"]


# --------------------------------------------------------------------------- broken streams


def test_error_event_mid_stream_exhausts_retries(caption, gateway):
    res = caption(one("C18", fail=99))
    assert res.code == 1
    r = res.row("r1")
    assert r["status"] == "error" and r["error_class"] == "stream_error"
    assert "CUDA out of memory" in r["error"]
    assert r["http_status"] == 200
    assert r["attempts"] == 3 and not r["caption"]


def test_connection_reset_mid_stream_is_retried(caption, gateway):
    res = caption(one("reset"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["caption"] == RETRY_CAPTION and r["attempts"] == 2
    assert gateway.calls()[0].outcome == "reset"


def test_connection_reset_every_time(caption, gateway):
    res = caption(one("reset", fail=99))
    assert res.code == 1
    r = res.row("r1")
    assert r["status"] == "error"
    assert r["error_class"] in ("connection", "stream_broken")
    assert r["attempts"] == 3 and gateway.count() == 3
    assert not r["caption"]


@pytest.mark.timeout(20)  # the server would stall for 30 s: a client that waits fails here
def test_a_stream_silent_longer_than_the_read_timeout_is_given_up_and_retried(caption,
                                                                            gateway):
    res = caption(one("C39"))  # --read-timeout 1
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["caption"] == RETRY_CAPTION and r["attempts"] == 2
    first, _ = gateway.calls()
    assert first.outcome == "client_gone"  # the client hung up, not the server
    assert sum(c.t < first.t + 1.0 for c in gateway.calls()) == 1  # not before 1 s of silence


@pytest.mark.timeout(20)
def test_a_stream_silent_every_time_is_a_timeout_error(caption, gateway):
    res = caption(one("C39", fail=99), retries=1)
    assert res.code == 1
    r = res.row("r1")
    assert r["status"] == "error" and r["error_class"] == "timeout"
    assert r["attempts"] == 2 and not r["caption"]
    assert [c.outcome for c in gateway.calls()] == ["client_gone"] * 2


@pytest.mark.parametrize("scenario,classes", [("C20", {"stream_broken", "connection"}),
                                              ("C20-eof", {"stream_broken"})])
def test_truncated_stream_every_time(caption, gateway, scenario, classes):
    res = caption(one(scenario, fail=99))
    assert res.code == 1
    r = res.row("r1")
    assert r["status"] == "error" and r["error_class"] in classes
    assert r["attempts"] == 3 and not r["caption"]


def test_invalid_json_chunk_is_retried(caption, gateway):
    res = caption(one("badjson"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["caption"] == RETRY_CAPTION and r["attempts"] == 2
    for frag in PARTIAL:
        assert frag.strip() not in r["caption"]


def test_invalid_json_chunk_every_time(caption, gateway):
    res = caption(one("badjson", fail=99))
    assert res.code == 1
    r = res.row("r1")
    assert r["status"] == "error"
    assert r["error_class"] in ("stream_broken", "stream_error")
    assert r["attempts"] == 3


def test_json_error_with_status_200_is_retried(caption, gateway):
    res = caption(one("json200"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["caption"] == RETRY_CAPTION and r["attempts"] == 2 and r["http_status"] == 200


def test_json_error_with_status_200_every_time(caption, gateway):
    res = caption(one("json200", fail=99))
    assert res.code == 1
    r = res.row("r1")
    assert r["status"] == "error" and "upstream overloaded" in r["error"]
    assert r["attempts"] == 3


# --------------------------------------------------------------------------- a mixed batch


def test_batch_of_20_with_permanent_failures(caption, gateway):
    bad = {3: "bad400", 7: "C34-process", 11: "C32", 15: "C34-convert"}
    retried = {5: "C18", 9: "s500"}   # s500 with fail=1 recovers on attempt 2
    rows = []
    for i in range(20):
        scen = bad.get(i) or retried.get(i) or "ok"
        q = {"fail": 1} if scen == "s500" else {}
        rows.append({"id": f"img{i:02d}", "image": img(scen, f"{i:02d}.jpg", **q)})
    res = caption(rows, concurrency=5)
    assert res.code == 1, res.stderr
    assert sorted(res.ids) == [f"img{i:02d}" for i in range(20)]
    for i, row in enumerate(rows):
        r = res.row(row["id"])
        if i in bad:
            assert r["status"] == "error" and r["attempts"] == 1, (i, r)
            assert r["error_class"] in ("bad_request", "bad_image", "too_large")
            assert gateway.count(row["image"]) == 1
        else:
            assert r["status"] == "ok", (i, r)
            assert r["attempts"] == (2 if i in retried else 1)
            expect = RETRY_CAPTION if i in retried else default_caption(row["image"])
            assert r["caption"] == expect


# --------------------------------------------------------------------------- bad input rows


def test_bad_input_rows_become_error_rows_and_the_run_goes_on(caption, gateway, tmp_path):
    shutil.copy(SAMPLES / "horse.png", tmp_path / "my horse, ünïcødé 馬.png")
    shutil.copy(SAMPLES / "rocket.jpg", tmp_path / "rocket.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not an image\n" * 20)
    rows = [
        {"id": "spaces", "image": "my horse, ünïcødé 馬.png"},
        {"id": "missing", "image": "no/such/file.png"},
        {"id": "zero", "image": "empty.png"},
        {"id": "text", "image": "notes.jpg"},
        {"id": "ftp", "image": "ftp://img.test/ok/a.jpg"},
        {"id": "fileurl", "image": "file:///etc/hostname"},
        {"id": "blank", "image": ""},
        {"id": "dup", "image": "rocket.jpg"},
        {"id": "dup", "image": img("ok", "dup-second.jpg")},
        {"id": "url", "image": img("ok", "u.jpg")},
    ]
    res = caption(rows)
    assert res.code == 1, res.stderr
    assert sorted(res.ids) == sorted({r["id"] for r in rows})   # one row per id
    expect = {"missing": "bad_image", "zero": "bad_image", "text": "bad_image",
              "ftp": "bad_input", "fileurl": "bad_input", "blank": "bad_input"}
    for id_, cls in expect.items():
        r = res.row(id_)
        assert r["status"] == "error" and r["error_class"] == cls, (id_, r)
        assert r["error"] and not r["caption"]
    assert res.row("spaces")["status"] == "ok"
    assert res.row("spaces")["caption"] == LOCAL_CAPTION
    assert res.row("spaces")["image"] == "my horse, ünïcødé 馬.png"
    assert res.row("dup")["caption"] == LOCAL_CAPTION      # the first "dup" was kept
    assert res.row("url")["caption"] == default_caption(img("ok", "u.jpg"))
    # bad rows never reach the server; the duplicate is not sent either
    sent = [c.url for c in gateway.calls()]
    assert len(sent) == 3
    assert img("ok", "dup-second.jpg") not in sent
    assert not any(u.startswith(("ftp:", "file:")) for u in sent)


# --------------------------------------------------------------------------- resume


def test_second_run_skips_everything_done(caption, gateway):
    rows = [{"id": f"s{i}", "image": img("ok", f"s{i}.jpg")} for i in range(6)]
    res = caption(rows)
    assert res.code == 0, res.stderr
    assert gateway.count() == 6
    gateway.clear()
    res2 = caption(rows)
    assert res2.code == 0, res2.stderr
    assert gateway.count() == 0, "a completed row was requested again"
    assert sorted(res2.ids) == sorted(r["id"] for r in rows)
    assert (res2.df["status"] == "ok").all()


def test_retry_errors_replaces_the_error_row(caption, gateway):
    rows = [{"id": "good", "image": img("ok")}, {"id": "flaky", "image": img("bad400")}]
    res = caption(rows)
    assert res.code == 1
    assert res.row("flaky")["status"] == "error"

    gateway.on("bad400", lambda ctx: ctx.ok(RETRY_CAPTION))
    gateway.clear()
    res2 = caption(rows)                     # plain rerun: error rows count as done
    assert gateway.count() == 0
    assert res2.code in (0, 1), res2.stderr
    assert res2.row("flaky")["status"] == "error"

    res3 = caption(rows, "--retry-errors")
    assert res3.code == 0, res3.stderr
    assert [c.url for c in gateway.calls()] == [img("bad400")]   # only the error row
    assert sorted(res3.ids) == ["flaky", "good"]                 # replaced, not appended
    r = res3.row("flaky")
    assert r["status"] == "ok" and r["caption"] == RETRY_CAPTION and r["error"] is None
