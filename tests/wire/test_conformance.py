"""Conformance cases C01..C40 (docs/protocol.md §10) against the real client.

Each test runs ``pipeline.cli.main`` in-process against tests/fake_gateway/ over real
TCP and asserts the Parquet row it wrote. The Anthropic-native cases (C36-C38) and the
n = 2 case (C16) are not covered here.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil

import pytest
from conftest import API_KEY, SAMPLES
from fake_gateway import (
    C24_MESSAGE,
    C27_USAGE,
    C32_MESSAGE,
    C40_MESSAGE,
    MODEL,
    PARTIAL,
    RETRY_CAPTION,
    SCENARIOS,
    decode_data_uri,
    default_caption,
    img,
)

C01_CAPTION = "A quiet harbour at dusk."


def one(scenario: str, **query: object) -> list[dict]:
    return [{"id": "r1", "image": img(scenario, **query)}]


def assert_ok_c01(r: dict, *, caption: str = C01_CAPTION, scenario: str = "C01") -> None:
    assert r["status"] == "ok", r
    assert r["caption"] == caption
    assert r["error"] is None and r["error_class"] is None
    assert r["finish_reason"] == "stop" and r["finish_reason_raw"] == "stop"
    assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (1200, 7, 1207)
    if "cached_tokens" in r:
        assert r["cached_tokens"] == 0
    assert r["usage_source"] == "reported"
    assert r["terminal"] == "done"
    assert r["attempts"] == 1
    assert r["http_status"] == 200
    assert r["request_id"] == f"req-{scenario}-1"


def assert_partial_never_kept(r: dict) -> None:
    for frag in PARTIAL:
        assert frag.strip() not in (r["caption"] or ""), r["caption"]


# --------------------------------------------------------------------------- C01


def test_c01_baseline_record_and_request_shape(caption, gateway):
    res = caption(one("C01"), "--model", "test-model", "--max-tokens", "77")
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert_ok_c01(r)
    assert r["prompt_name"] == "default"
    assert r["image"] == img("C01")
    assert r["model"] in (MODEL, "test-model")
    assert r["latency_s"] is not None and r["latency_s"] > 0
    assert r["ttft_s"] is not None and 0 <= r["ttft_s"] <= r["latency_s"]
    assert r["finished_at"] is not None

    (req,) = gateway.calls()
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.headers.get("Authorization") == f"Bearer {API_KEY}"
    assert req.headers.get("Content-Type", "").startswith("application/json")
    b = req.body
    assert b["model"] == "test-model"
    assert b["stream"] is True
    assert b["stream_options"] == {"include_usage": True}
    assert b["max_tokens"] == 77
    assert b.get("n", 1) == 1
    user = [m for m in b["messages"] if m["role"] == "user"]
    assert len(user) == 1
    kinds = [p["type"] for p in user[0]["content"]]
    assert kinds == ["text", "image_url"]
    assert user[0]["content"][1]["image_url"]["url"] == img("C01")  # passed through unchanged


def test_request_carries_system_prompt_temperature_and_row_prompt(caption, gateway):
    rows = [{"id": "p1", "image": img("ok", "p1.jpg"), "prompt": "", "note": "007"},
            {"id": "p2", "image": img("ok", "p2.jpg"), "prompt": "Count the boats.",
             "note": "a, b"}]
    res = caption(rows, "--prompt", "Describe the photo.", "--system", "Be brief.",
                  "--temperature", "0.3", "--max-tokens", "50")
    assert res.code == 0, res.stderr
    by_url = {c.url: c for c in gateway.calls()}
    b1, b2 = by_url[img("ok", "p1.jpg")], by_url[img("ok", "p2.jpg")]
    for req in (b1, b2):
        assert req.body["messages"][0] == {"role": "system", "content": "Be brief."}
        assert req.body["temperature"] == pytest.approx(0.3)
        assert req.body["max_tokens"] == 50
    assert b1.prompt_text == "Describe the photo."   # empty cell -> the --prompt default
    assert b2.prompt_text == "Count the boats."      # the row's prompt column wins
    # extra manifest columns are copied to the output as strings
    assert res.row("p1")["note"] == "007"
    assert res.row("p2")["note"] == "a, b"
    assert res.row("p2")["caption"] == default_caption(img("ok", "p2.jpg"))


def test_api_key_falls_back_to_openai_api_key(caption, gateway, monkeypatch):
    monkeypatch.delenv("CAPTION_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-fallback-7")
    res = caption(one("ok"))
    assert res.code == 0, res.stderr
    assert gateway.calls()[0].headers.get("Authorization") == "Bearer sk-openai-fallback-7"


def test_caption_api_key_wins_over_openai_api_key(caption, gateway, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-loser-8")
    res = caption(one("ok"))
    assert res.code == 0, res.stderr
    assert gateway.calls()[0].headers.get("Authorization") == f"Bearer {API_KEY}"


def test_base_url_from_environment(caption, gateway, monkeypatch):
    monkeypatch.setenv("CAPTION_BASE_URL", gateway.base_url)
    res = caption(one("ok"), base_url=None)
    assert res.code == 0, res.stderr
    assert res.row("r1")["status"] == "ok"
    assert gateway.count() == 1


def test_local_file_goes_as_data_uri_with_sniffed_mime(caption, gateway, tmp_path):
    from PIL import Image

    # a PNG whose name says .jpg: the MIME type must come from the content
    shutil.copy(SAMPLES / "horse.png", tmp_path / "horse.jpg")
    shutil.copy(SAMPLES / "rocket.jpg", tmp_path / "rocket.jpg")
    res = caption([{"id": "h", "image": "horse.jpg"},
                   {"id": "k", "image": str(tmp_path / "rocket.jpg")}])
    assert res.code == 0, res.stderr
    assert res.row("h")["caption"] == "A local image."
    assert res.row("h")["image"] == "horse.jpg"
    sent = sorted(gateway.calls(), key=lambda c: len(c.url))
    assert len(sent) == 2
    for req in sent:
        assert req.url.startswith("data:image/") and ";base64," in req.url
        mime, data = decode_data_uri(req.url)
        fmt = Image.open(io.BytesIO(data)).format
        assert mime == {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]


# --------------------------------------------------------------------------- C02..C08


def test_c02_utf8_split_one_byte_per_write(caption):
    res = caption(one("C02"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert_ok_c01(r, caption="A café, 世界 and 🚀.", scenario="C02")
    assert "\ufffd" not in r["caption"]


@pytest.mark.parametrize("scenario", ["C03", "C04", "C05", "C06", "C07"])
def test_framing_variants_give_the_c01_record(caption, scenario):
    """C03 CRLF split between reads, C04 lone CR / mixed endings, C05 no space after
    the colon, C06 keep-alives (4 x 0.6 s > the 1 s idle limit) and ignorable fields,
    C07 Azure filter chunk with empty choices."""
    res = caption(one(scenario))
    assert res.code == 0, res.stderr
    assert_ok_c01(res.row("r1"), scenario=scenario)


def test_c08_multi_line_data_is_joined(caption):
    res = caption(one("C08"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["caption"] == "Two gulls."
    assert r["status"] == "ok" and r["finish_reason"] == "stop" and r["attempts"] == 1


# --------------------------------------------------------------------------- usage


def test_c09_usage_in_the_finish_chunk(caption):
    res = caption(one("C09"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["caption"] == "Gulls wheel overhead."
    assert r["finish_reason"] == "stop"
    assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (1090, 12, 1102)
    assert r["usage_source"] == "reported"


def test_c10_cumulative_usage_keeps_the_last_not_the_sum(caption):
    res = caption(one("C10"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["caption"] == "One two three"
    assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (900, 4, 904)


def test_c11_usage_after_a_silent_gap_is_still_read(caption):
    res = caption(one("C11"), "--read-timeout", "3", "--grace", "3")
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert_ok_c01(r, scenario="C11")
    assert r["latency_s"] >= 1.4


def test_c12_usage_chunk_with_a_second_finish(caption):
    res = caption(one("C12"))
    assert res.code == 0, res.stderr
    assert_ok_c01(res.row("r1"), scenario="C12")


def test_c13_no_usage_at_all(caption):
    res = caption(one("C13"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["status"] == "ok" and r["caption"] == C01_CAPTION
    assert r["usage_source"] == "absent"
    assert r["prompt_tokens"] is None and r["completion_tokens"] is None
    assert r["total_tokens"] is None
    assert r["terminal"] == "done"


def test_c14_empty_string_finish_reasons_do_not_overwrite_stop(caption):
    res = caption(one("C14"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["caption"] == C01_CAPTION
    assert r["finish_reason"] == "stop" and r["finish_reason_raw"] == "stop"
    assert r["usage_source"] == "absent" and r["prompt_tokens"] is None
    assert r["attempts"] == 1


def test_c15_reasoning_is_dropped_and_nonzero_index_folded(caption):
    res = caption(one("C15"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["caption"] == C01_CAPTION
    assert "REASONING" not in r["caption"]
    assert r["finish_reason"] == "stop"
    assert (r["prompt_tokens"], r["completion_tokens"]) == (1200, 7)


@pytest.mark.parametrize("scenario,quirk", [("C12", "duplicate_finish"),
                                            ("C15", "nonzero_index")])
def test_quirks_are_recorded(caption, scenario, quirk):
    """docs/protocol.md §10 C12/C15: the anomaly is counted in the quirks column."""
    res = caption(one(scenario))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert "quirks" in r, "no quirks column"
    assert quirk in json.loads(r["quirks"] or "{}"), r["quirks"]


# --------------------------------------------------------------------------- C17


@pytest.mark.parametrize("raw,norm,status,error_class", [
    ("max_tokens", "length", "ok", None),
    ("length", "length", "ok", None),
    ("end_turn", "stop", "ok", None),
    ("refusal", "content_filter", "error", "refused"),
    ("content_filter", "content_filter", "error", "refused"),
])
def test_c17_non_standard_finish_reasons(caption, gateway, raw, norm, status, error_class):
    res = caption(one(f"C17-{raw}"))
    assert res.code == (0 if status == "ok" else 1), res.stderr
    r = res.row("r1")
    assert r["status"] == status
    assert r["error_class"] == error_class
    assert r["attempts"] == 1 and gateway.count() == 1  # a refusal is not retried
    if status == "ok":
        assert r["caption"] == C01_CAPTION
    else:
        assert not r["caption"]
        assert r["error"]
    # normalized and raw finish reasons are kept, on error rows too (docs/protocol.md §9.2, §10 C17)
    assert (r["finish_reason"], r["finish_reason_raw"]) == (norm, raw)


# --------------------------------------------------------------------------- C18..C25


@pytest.mark.parametrize("scenario", ["C18", "C19", "C20", "C20-eof", "C24", "C39"])
def test_failed_attempt_is_retried_and_its_text_discarded(caption, gateway, scenario):
    """C18 error object, C19 OpenRouter finish_reason=error, C20 truncated (FIN /
    clean EOF), C24 bare JSON error line, C39 stall: attempt 2 succeeds."""
    res = caption(one(scenario))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["status"] == "ok"
    assert r["caption"] == RETRY_CAPTION   # exactly the retry's text, nothing of attempt 1
    assert_partial_never_kept(r)
    assert r["attempts"] == 2
    assert r["finish_reason"] == "stop" and r["error"] is None and r["error_class"] is None
    assert r["request_id"] == f"req-{scenario.split('-')[0]}-2"
    assert gateway.count() == 2


@pytest.mark.parametrize("scenario,message", [
    ("C18", "CUDA out of memory"),
    ("C19", "Provider disconnected unexpectedly"),
    ("C24", C24_MESSAGE),
])
def test_in_stream_error_message_is_recorded_when_retries_run_out(caption, gateway,
                                                                   scenario, message):
    res = caption(one(scenario, fail=99))
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert r["status"] == "error"
    assert r["error_class"] == "stream_error"
    assert message in r["error"]
    assert not r["caption"]
    assert r["attempts"] == 3 and gateway.count() == 3


def test_c21_done_without_finish_reason_is_not_success(caption, gateway):
    res = caption(one("C21"))
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert r["status"] == "error"
    assert r["error_class"] == "stream_broken"
    assert "finish" in r["error"].lower()
    assert not r["caption"]
    assert r["attempts"] == 3 and gateway.count() == 3


def test_c22_finish_without_done_is_complete(caption):
    res = caption(one("C22"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["status"] == "ok" and r["caption"] == C01_CAPTION
    assert r["terminal"] == "eof_after_finish"
    assert (r["prompt_tokens"], r["completion_tokens"]) == (1200, 7)
    assert r["attempts"] == 1


def test_c23_empty_completion_is_a_permanent_empty_error(caption, gateway):
    res = caption(one("C23"))
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert r["status"] == "error"
    assert r["error_class"] == "empty"
    assert not r["caption"]
    assert r["attempts"] == 1 and gateway.count() == 1


def test_c25_replayed_attempt_is_never_concatenated(caption, gateway):
    res = caption(one("C25"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["status"] == "ok"
    assert_partial_never_kept(r)
    assert r["caption"] in ("A complete caption.", "Clean retry caption.")
    assert r["attempts"] == (1 if r["caption"] == "A complete caption." else 2)
    assert r["attempts"] == gateway.count()


# --------------------------------------------------------------------------- C26, C27


@pytest.mark.timeout(30)  # "does not hang": a hung read would end the test here
def test_c26_json_error_instead_of_sse_stops_the_run_as_not_found(caption, gateway):
    res = caption(one("C26"))
    assert res.code == 3, res.stderr  # a model that does not exist fails every row
    assert res.df.empty and gateway.count() == 1
    (line,) = res.stderr_lines()
    assert "model not found" in line


def test_c27_non_streamed_completion_is_accepted(caption):
    res = caption(one("C27"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["status"] == "ok"
    assert r["caption"] == "A tabby cat on a sill."
    assert r["finish_reason"] == "stop"
    assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (
        C27_USAGE["prompt_tokens"], C27_USAGE["completion_tokens"], C27_USAGE["total_tokens"])
    assert r["usage_source"] == "reported"
    assert r["attempts"] == 1


# --------------------------------------------------------------------------- 429s
# A server-directed wait is checked by counting the requests the server saw before the
# moment it allows (its arrival clock): the client receives the 429 only after the
# request arrived, so none may come sooner, however busy the machine is.


def seen_before(gateway, moment: float, url: str | None = None,
                not_url: str | None = None) -> int:
    return sum(1 for c in gateway.calls(url) if c.t < moment and c.url != not_url)


async def _c28_once_two_others_are_in_flight(ctx):
    """C28, answered once two other rows' requests have arrived: which requests were
    in flight when the 429 came is then a fact, not a race."""
    for _ in range(2000):  # at most 10 s
        if ctx.attempt > 1 or ctx.gw.count() >= 3:
            break
        await asyncio.sleep(0.005)
    return await SCENARIOS["C28"](ctx)


def test_c28_retry_after_pauses_the_whole_pool(caption, gateway):
    gateway.on("pool", _c28_once_two_others_are_in_flight)
    limited = img("pool", ra=2)
    others = [img("slow", f"{i}.jpg", n=5, pace=0.1) for i in range(4)]  # ~0.8 s each
    # Third: slow start sends o0 alone, then o1, then this one (docs/protocol.md §5.4).
    rows = [{"id": f"o{i}", "image": u} for i, u in enumerate(others)]
    rows.insert(2, {"id": "limited", "image": limited})
    res = caption(rows, concurrency=3)
    assert res.code == 0, res.stderr
    r = res.row("limited")
    assert (r["status"], r["caption"], r["attempts"]) == ("ok", RETRY_CAPTION, 2)
    assert r["retry_after_s"] == 2.0
    assert all(res.row(f"o{i}")["caption"] == default_caption(u) for i, u in enumerate(others))

    first = gateway.calls(limited)[0]
    answered, allowed = first.t_end, first.t + 2.0
    assert seen_before(gateway, allowed, url=limited) == 1       # no retry within 2 s
    assert seen_before(gateway, answered, not_url=limited) == 2  # in flight at the 429
    assert seen_before(gateway, allowed, not_url=limited) == 2   # nobody else started
    assert gateway.count() - 1 == 5                              # o2, o3 and the retry after


def test_c29_retry_after_http_date_is_honoured(caption, gateway):
    res = caption(one("C29"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["status"] == "ok" and r["attempts"] == 2
    # the date has 1 s resolution: it lies 2..3 s after the 429 was written
    assert seen_before(gateway, gateway.calls()[0].t + 2.0) == 1
    assert 2.0 <= r["retry_after_s"] <= 3.0


@pytest.mark.parametrize("variant,wait", [("go", 1.5), ("rfc3339", 1.0)])
def test_c30_reset_headers_without_retry_after_are_honoured(caption, gateway, variant, wait):
    """No Retry-After: the exhausted bucket's reset (Go duration ``0m1.5s``, or an
    RFC 3339 time 2 s ahead at 1 s resolution: 1..2 s) says when to try again."""
    res = caption(one(f"C30-{variant}"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["status"] == "ok" and r["attempts"] == 2
    assert seen_before(gateway, gateway.calls()[0].t + wait) == 1
    assert wait <= r["retry_after_s"] <= (1.5 if variant == "go" else 2.0)


@pytest.mark.parametrize("variant,word", [("quota", "quota"), ("spend", "spend")])
def test_c31_quota_exhausted_stops_the_run(caption, gateway, variant, word):
    bad = img(f"C31-{variant}")
    rows = [{"id": "a", "image": img("ok", "a.jpg")}, {"id": "b", "image": img("ok", "b.jpg")},
            {"id": "q", "image": bad}] + [
        {"id": f"z{i}", "image": img("ok", f"z{i}.jpg")} for i in range(4)]
    res = caption(rows, concurrency=1)
    assert res.code == 3, res.stderr
    assert sorted(res.ids) == ["a", "b"]          # finished rows kept, nothing else
    assert gateway.count(bad) == 1                # no retry storm
    assert gateway.count() == 3                   # no new rows scheduled after it
    (line,) = res.stderr_lines()                  # one line says why
    assert word in line.lower() and "Traceback" not in res.stderr

    # the account is fixed: a rerun captions the rest, exactly once each
    gateway.on("C31", lambda ctx: ctx.ok(RETRY_CAPTION))
    gateway.clear()
    res2 = caption(rows, concurrency=1)
    assert res2.code == 0, res2.stderr
    assert sorted(res2.ids) == sorted(r["id"] for r in rows)
    assert (res2.df["status"] == "ok").all()
    assert gateway.count(img("ok", "a.jpg")) == 0 and gateway.count(bad) == 1
    assert res2.row("q")["caption"] == RETRY_CAPTION


def test_c32_request_too_large_429_is_permanent(caption, gateway):
    res = caption(one("C32"))
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert r["status"] == "error" and r["error_class"] == "too_large"
    assert C32_MESSAGE in r["error"]
    assert r["http_status"] == 429
    assert r["attempts"] == 1 and gateway.count() == 1


# --------------------------------------------------------------------------- 5xx, 4xx


@pytest.mark.parametrize("variant", ["529", "503", "502"])
def test_c33_overload_and_server_errors_are_retried(caption, gateway, variant):
    res = caption(one(f"C33-{variant}"))
    assert res.code == 0, res.stderr
    r = res.row("r1")
    assert r["status"] == "ok" and r["caption"] == RETRY_CAPTION
    assert r["attempts"] == 2 and gateway.count() == 2
    assert r["http_status"] == 200
    if variant == "503":  # Retry-After: 1
        assert seen_before(gateway, gateway.calls()[0].t + 1.0) == 1
        assert r["retry_after_s"] == 1.0


@pytest.mark.parametrize("variant,status,classes,text", [
    ("5mb", 400, {"bad_image", "too_large"}, "5 MB maximum"),
    ("process", 400, {"bad_image", "bad_request"}, "Could not process image"),
    ("mediatype", 400, {"bad_image", "bad_request"}, "does not match the provided media type"),
    ("convert", 500, {"bad_image", "bad_request"}, "convert request failed"),
    ("422", 422, {"bad_image", "bad_request"}, "Unprocessable entity"),
    ("413", 413, {"too_large"}, "Request entity too large"),
    ("noretry", 503, {"bad_request", "bad_image", "server"}, "Service refuses this input"),
])
def test_c34_permanent_row_errors_are_not_retried(caption, gateway, variant, status, classes,
                                                  text):
    bad = img(f"C34-{variant}")
    res = caption([{"id": "bad", "image": bad}, {"id": "good", "image": img("ok")}])
    assert res.code == 1, res.stderr
    r = res.row("bad")
    assert r["status"] == "error"
    assert r["error_class"] in classes
    assert text in r["error"]
    assert r["http_status"] == status
    assert r["attempts"] == 1 and gateway.count(bad) == 1
    assert res.row("good")["status"] == "ok"     # the batch went on


@pytest.mark.parametrize("variant", ["401", "403", "404"])
def test_c35_auth_and_model_errors_stop_the_run_with_one_line(caption, gateway, variant):
    """The one wire test of "a wrong key (or model) is fatal": the rows before it are
    kept, nothing is sent after it, exit 3, one stderr line that names the status and
    (for a key) where the key came from, and never the key itself. Rows in flight at
    that moment: tests/unit/test_local_engine.py; the classification: test_errors.py."""
    bad = img(f"C35-{variant}")
    rows = [{"id": "first", "image": img("ok", "first.jpg")}, {"id": "bad", "image": bad}] + [
        {"id": f"later{i}", "image": img("ok", f"l{i}.jpg")} for i in range(3)]
    res = caption(rows, concurrency=1)
    assert res.code == 3, res.stderr
    assert res.ids == ["first"]
    assert gateway.count(bad) == 1 and gateway.count() == 2
    (line,) = res.stderr_lines()
    assert variant in line and "Traceback" not in res.stderr
    if variant != "404":
        assert "the key came from CAPTION_API_KEY" in line
    assert API_KEY not in res.stderr and API_KEY not in res.stdout


def test_c40_gemini_array_error_body(caption, gateway):
    res = caption([{"id": "r1", "image": img("C40")}, {"id": "good", "image": img("ok")}])
    assert res.code == 1, res.stderr
    r = res.row("r1")
    assert r["status"] == "error"
    assert r["error_class"] in ("bad_request", "bad_input")
    assert C40_MESSAGE in r["error"]
    assert r["http_status"] == 400
    assert r["attempts"] == 1 and gateway.count(img("C40")) == 1


def test_data_uri_payload_is_valid_base64(caption, gateway, tmp_path):
    shutil.copy(SAMPLES / "camera.png", tmp_path / "camera.png")
    res = caption([{"id": "c", "image": "camera.png"}])
    assert res.code == 0, res.stderr
    (req,) = gateway.calls()
    payload = req.url.partition(",")[2]
    base64.b64decode(payload, validate=True)


# --------------------------------------------------------------------------- the fake itself


async def test_fake_gateway_self_check(gateway):
    """The server does what the cases above rely on (independent of the client)."""
    import aiohttp

    def body(url: str) -> dict:
        return {"model": "m", "stream": True, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}]}

    async with aiohttp.ClientSession() as s:
        post = f"{gateway.base_url}/chat/completions"
        async with s.post(post, json=body(img("C01"))) as r:
            data = await r.read()
            assert r.status == 200 and r.headers["x-request-id"] == "req-C01-1"
        assert data.endswith(b"data: [DONE]\n\n") and b'"A quiet"' in data
        async with s.post(post, json=body(img("C20"))) as r:      # attempt 1: cut
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        async with s.post(post, json=body(img("C20"))) as r:      # attempt 2: ok
            assert RETRY_CAPTION.split()[0].encode() in await r.read()
        async with s.post(post, json=body(img("C28"))) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "2"
    assert [c.attempt for c in gateway.calls(img("C20"))] == [1, 2]
    assert [c.outcome for c in gateway.calls(img("C20"))] == ["cut", "ok"]
