"""Request options, n > 1, structured output, prompt templates and the Anthropic Messages
API, over real TCP on 127.0.0.1.

The client runs in-process (``caption`` fixture). OpenAI-compatible requests go to the
fake gateway (tests/fake_gateway/), with scenarios scripted here via ``gateway.on``;
the Anthropic-native side is its ``AnthropicGateway`` (route ``POST /v1/messages``),
scripted per test. Every assertion about options is made on the request body the server
actually received.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import API_KEY, clean
from fake_gateway import (
    A_MODEL,
    A_VERSION,
    PING,
    USAGE_OK,
    AnthropicGateway,
    ARequest,
    Ctx,
    a_delta,
    a_event,
    a_start,
    a_stream,
    chunk,
    done,
    img,
    sse,
    usage_chunk,
)
from PIL import Image

# Every option key the client may add to an OpenAI request body.
OPTION_KEYS = ("temperature", "top_p", "n", "stop", "presence_penalty", "frequency_penalty",
               "logit_bias", "user", "seed", "response_format")


def one(scenario: str, name: str = "a.jpg") -> list[dict[str, str]]:
    return [{"id": "r1", "image": img(scenario, name)}]


def row(res: Any, id: str) -> dict[str, Any]:
    """The output row of ``id``, list columns (``captions``) as Python lists of str.

    (conftest's ``Result.row`` runs every value through ``clean``, which turns a
    1-element array into its scalar and fails on a longer one.)
    """
    assert not res.df.empty, f"no output rows; exit={res.code}; stderr={res.stderr!r}"
    hits = res.df[res.df["id"].astype(str) == id]
    assert len(hits) == 1, f"{len(hits)} rows for id {id!r}: {res.ids}"
    out: dict[str, Any] = {}
    for k, v in hits.iloc[0].to_dict().items():
        if getattr(v, "ndim", 0) >= 1 or isinstance(v, list):
            out[k] = [str(x) for x in list(v)]
        else:
            out[k] = clean(v)
    return out


def only_request(gateway: Any) -> Any:
    reqs = gateway.calls()
    assert len(reqs) == 1, [(r.path, r.attempt) for r in reqs]
    return reqs[0]


def assert_rejected_before_any_request(res: Any, gateway: Any, *servers: Any,
                                       mentions: str | None = None) -> None:
    assert res.code == 2, (res.code, res.stderr)
    lines = res.stderr_lines()
    assert len(lines) == 1, lines
    assert "Traceback" not in res.stderr
    if mentions is not None:
        assert mentions in lines[0], lines[0]
    assert gateway.count() == 0, [r.path for r in gateway.calls()]
    for s in servers:
        assert s.count() == 0, s.requests()
    assert res.df.empty


# --------------------------------------------------------------------------- OpenAI scenarios

JSON_DOC = {"subject": "a tabby cat", "colours": ["orange", "white"], "count": 1,
            "note": "café ☕"}
# Pretty-printed with odd whitespace: caption_json must be the parsed and re-serialized doc.
JSON_TEXT = '\n{\n  "subject" :  "a tabby cat",\n  "colours": [ "orange",\n "white" ],' \
            '\n  "count": 1, "note": "café ☕"\n}\n'
BAD_JSON_TEXT = 'Sure! Here is the JSON: {"subject": "a tabby cat", "colours": ["orange"'

N2_TEXTS = (["A red", " barn", " at", " dawn."], ["Farm", " building", " in", " morning light."])
N2_RETRY_TEXTS = (["Retry", " zero."], ["Retry", " one."])


def choices_chunk(*parts: tuple[int, str | None, str | None]) -> dict[str, Any]:
    """One chunk carrying several choices: (index, content, finish_reason) each."""
    c = chunk("x")
    c["choices"] = [{"index": i, "delta": {} if text is None else {"content": text},
                     "logprobs": None, "finish_reason": fr} for i, text, fr in parts]
    return c


async def _opt(ctx: Ctx) -> web.StreamResponse:
    """A well-formed answer to whatever was asked: ``n`` choices (from the body), JSON
    text when a response_format was requested."""
    body = ctx.rec.body or {}
    n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
    evs = [chunk("", role=True, index=i) for i in range(n)]
    for i in range(n):
        text = (json.dumps({"subject": f"option {i}"}) if body.get("response_format")
                else f"Option caption {i}.")
        evs.append(chunk(text, index=i))
    evs += [chunk(None, finish="stop", index=i) for i in range(n)]
    evs.append(usage_chunk(USAGE_OK))
    return await ctx.sse_response(b"".join(sse(e) for e in evs) + done())


def _n2_events(texts: tuple[list[str], list[str]], *, finish_1: bool = True,
               cid: str = "chatcmpl-n2") -> list[dict[str, Any]]:
    """Both choices' chunks interleaved; choice 1 finishes before choice 0 (or never)."""
    t0, t1 = texts
    evs = [chunk("", role=True, index=0, cid=cid), chunk("", role=True, index=1, cid=cid),
           chunk(t1[0], index=1, cid=cid), chunk(t0[0], index=0, cid=cid)]
    if len(t0) > 2:
        evs.append(choices_chunk((0, t0[1], None), (1, t1[1], None)))  # both in one chunk
        evs[-1]["id"] = cid
        rest0, rest1 = t0[2:], t1[2:]
    else:
        rest0, rest1 = t0[1:], t1[1:]
    for a, b in zip(rest1, rest0):
        evs += [chunk(a, index=1, cid=cid), chunk(b, index=0, cid=cid)]
    # choice 1 ends first; choice 0 keeps streaming after it
    if finish_1:
        evs.insert(len(evs) - 1, chunk(None, finish="stop", index=1, cid=cid))
    evs.append(chunk(None, finish="stop", index=0, cid=cid))
    evs.append(usage_chunk({"prompt_tokens": 1000, "completion_tokens": 20,
                            "total_tokens": 1020}, cid=cid))
    return evs


async def _n2(ctx: Ctx) -> web.StreamResponse:
    body = b"".join(sse(e) for e in _n2_events(N2_TEXTS)) + done()
    return await ctx.sse_response(body, chunk_size=13)


async def _n2_unfinished(ctx: Ctx) -> web.StreamResponse:
    """Attempt 1: choice 1 never gets a finish_reason (but the stream ends cleanly)."""
    if ctx.attempt == 1:
        body = b"".join(sse(e) for e in _n2_events(N2_TEXTS, finish_1=False)) + done()
    else:
        body = b"".join(sse(e) for e in _n2_events(N2_RETRY_TEXTS, cid="chatcmpl-n2b")) + done()
    return await ctx.sse_response(body)


def _text_stream(text: str, size: int = 9) -> bytes:
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    evs = [chunk("", role=True)] + [chunk(p) for p in pieces]
    evs += [chunk(None, finish="stop"), usage_chunk(USAGE_OK)]
    return b"".join(sse(e, ascii=False) for e in evs) + done()


JSON_MODE = {"valid": True}  # the "jsonflip" scenario answers valid JSON while True


async def _json_ok(ctx: Ctx) -> web.StreamResponse:
    return await ctx.sse_response(_text_stream(JSON_TEXT))


async def _json_bad(ctx: Ctx) -> web.StreamResponse:
    return await ctx.sse_response(_text_stream(BAD_JSON_TEXT))


async def _json_flip(ctx: Ctx) -> web.StreamResponse:
    return await ctx.sse_response(_text_stream(JSON_TEXT if JSON_MODE["valid"]
                                               else BAD_JSON_TEXT))


async def _json_nan(ctx: Ctx) -> web.StreamResponse:
    return await ctx.sse_response(_text_stream('{"subject": "cat", "score": NaN}'))


@pytest.fixture
def gw(gateway: Any) -> Any:
    for name, handler in {"opt": _opt, "n2": _n2, "n2open": _n2_unfinished,
                          "jsonok": _json_ok, "jsonbad": _json_bad, "jsonflip": _json_flip,
                          "jsonnan": _json_nan}.items():
        gateway.on(name, handler)
    return gateway


# --------------------------------------------------------------------------- each option

OPTION_CASES = [
    pytest.param(["--temperature", "0.7"], "temperature", 0.7, float, id="temperature"),
    pytest.param(["--temperature", "0"], "temperature", 0.0, float, id="temperature-zero"),
    pytest.param(["--top-p", "0.9"], "top_p", 0.9, float, id="top-p"),
    pytest.param(["--n", "3"], "n", 3, int, id="n"),
    pytest.param(["--stop", "###"], "stop", ["###"], list, id="stop-once"),
    pytest.param(["--max-tokens", "123"], "max_tokens", 123, int, id="max-tokens"),
    pytest.param(["--presence-penalty", "-1.5"], "presence_penalty", -1.5, float,
                 id="presence-penalty"),
    pytest.param(["--frequency-penalty", "0.25"], "frequency_penalty", 0.25, float,
                 id="frequency-penalty"),
    pytest.param(["--logit-bias", '{"50256": -100, "1734": 7}'], "logit_bias",
                 {"50256": -100, "1734": 7}, dict, id="logit-bias"),
    pytest.param(["--user", "user-42"], "user", "user-42", str, id="user"),
    pytest.param(["--seed", "12345"], "seed", 12345, int, id="seed"),
    pytest.param(["--seed", "0"], "seed", 0, int, id="seed-zero"),
    pytest.param(["--response-format", "json_object"], "response_format",
                 {"type": "json_object"}, dict, id="response-format-json-object"),
]


@pytest.mark.parametrize("argv, key, value, typ", OPTION_CASES)
def test_option_lands_in_request_body_with_json_type(caption, gw, argv, key, value, typ):
    res = caption(one("opt"), *argv)
    assert res.code == 0, res.stderr
    body = only_request(gw).body
    assert key in body, sorted(body)
    assert body[key] == value
    assert type(body[key]) is typ, (key, body[key])
    if key == "logit_bias":  # JSON integers, token ids as strings
        assert all(type(v) is int for v in body[key].values()), body[key]
    # The other options were not given, so they are not sent (the API's defaults apply).
    assert not {k for k in OPTION_KEYS if k in body} - {key}, sorted(body)
    r = row(res, "r1")
    assert r["status"] == "ok", r
    if key == "n":
        assert r["captions"] is not None and len(r["captions"]) == 3


def test_no_options_sends_no_option_fields(caption, gw):
    res = caption(one("opt"))
    assert res.code == 0, res.stderr
    body = only_request(gw).body
    assert [k for k in OPTION_KEYS if k in body and not (k == "n" and body[k] == 1)] == []
    assert body["max_tokens"] == 300
    r = row(res, "r1")
    assert r["caption"] == "Option caption 0."
    assert r["captions"] == ["Option caption 0."]
    assert r["caption_json"] is None and r["json_valid"] is None


def test_stop_given_twice_is_a_list_of_two_in_order(caption, gw):
    res = caption(one("opt"), "--stop", "END", "--stop", "\n\n")
    assert res.code == 0, res.stderr
    assert only_request(gw).body["stop"] == ["END", "\n\n"]


def test_fifth_stop_is_rejected_before_any_request(caption, gw):
    stops = [a for s in ("a", "b", "c", "d", "e") for a in ("--stop", s)]
    res = caption(one("opt"), *stops)
    assert_rejected_before_any_request(res, gw, mentions="--stop")


@pytest.mark.parametrize("argv, mentions", [
    pytest.param(["--temperature", "2.5"], "--temperature", id="temperature-2.5"),
    pytest.param(["--temperature", "-0.1"], "--temperature", id="temperature-negative"),
    pytest.param(["--top-p", "1.5"], "--top-p", id="top-p-1.5"),
    pytest.param(["--presence-penalty", "3"], "--presence-penalty", id="presence-penalty-3"),
    pytest.param(["--frequency-penalty", "-2.5"], "--frequency-penalty",
                 id="frequency-penalty--2.5"),
    pytest.param(["--logit-bias", '{"50256": 200}'], "--logit-bias", id="logit-bias-200"),
    pytest.param(["--logit-bias", '{"50256": -101}'], "--logit-bias", id="logit-bias--101"),
    pytest.param(["--logit-bias", '{"hello": 5}'], "--logit-bias", id="logit-bias-not-token-id"),
    pytest.param(["--logit-bias", '{"50256": 2.5}'], "--logit-bias", id="logit-bias-float"),
    pytest.param(["--logit-bias", '{"50256": true}'], "--logit-bias", id="logit-bias-bool"),
    pytest.param(["--logit-bias", "{50256: -100}"], "--logit-bias", id="logit-bias-not-json"),
    pytest.param(["--logit-bias", "[1, 2]"], "--logit-bias", id="logit-bias-not-object"),
    pytest.param(["--n", "0"], "--n", id="n-0"),
    pytest.param(["--n", "129"], "--n", id="n-129"),
    pytest.param(["--max-tokens", "0"], "--max-tokens", id="max-tokens-0"),
    pytest.param(["--extra-body", '["top_k", 40]'], "--extra-body", id="extra-body-not-object"),
    pytest.param(["--extra-body", "{top_k: 40}"], "--extra-body", id="extra-body-not-json"),
    pytest.param(["--response-format", "no-such-schema.json"], "--response-format",
                 id="response-format-missing-file"),
])
def test_out_of_range_option_exits_2_without_a_request(caption, gw, argv, mentions):
    res = caption(one("opt"), *argv)
    assert_rejected_before_any_request(res, gw, mentions=mentions)


def test_range_boundaries_are_accepted(caption, gw):
    res = caption(one("opt"), "--temperature", "2", "--top-p", "0", "--presence-penalty", "-2",
                  "--frequency-penalty", "2", "--logit-bias", '{"1": 100, "2": -100}')
    assert res.code == 0, res.stderr
    body = only_request(gw).body
    assert (body["temperature"], body["top_p"]) == (2.0, 0.0)
    assert (body["presence_penalty"], body["frequency_penalty"]) == (-2.0, 2.0)
    assert body["logit_bias"] == {"1": 100, "2": -100}


def test_extra_body_merges_top_level_fields(caption, gw):
    extra = {"top_k": 40, "repetition_penalty": 1.05, "provider": {"order": ["fast", "cheap"]},
             "safe_prompt": False}
    res = caption(one("opt"), "--temperature", "0.3", "--model", "vendor-model",
                  "--extra-body", json.dumps(extra))
    assert res.code == 0, res.stderr
    body = only_request(gw).body
    for k, v in extra.items():
        assert body[k] == v and type(body[k]) is type(v), (k, body.get(k))
    assert "extra_body" not in body  # merged, not nested
    # The rest of the request is intact.
    assert body["model"] == "vendor-model" and body["stream"] is True
    assert body["temperature"] == 0.3 and body["max_tokens"] == 300
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert row(res, "r1")["status"] == "ok"


# --------------------------------------------------------------------------- response_format


def test_response_format_schema_file_sends_json_schema(caption, gw, tmp_path):
    schema = {"type": "object", "properties": {"subject": {"type": "string"}},
              "required": ["subject"], "additionalProperties": False}
    path = tmp_path / "caption schema.json"
    path.write_text(json.dumps(schema))
    res = caption(one("opt"), "--response-format", str(path))
    assert res.code == 0, res.stderr
    rf = only_request(gw).body["response_format"]
    assert rf["type"] == "json_schema", rf
    assert rf["json_schema"]["schema"] == schema
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", rf["json_schema"]["name"]), rf
    r = row(res, "r1")
    assert r["status"] == "ok" and r["json_valid"] is True
    assert json.loads(r["caption_json"]) == {"subject": "option 0"}


def test_json_mode_valid_text_becomes_caption_json(caption, gw):
    res = caption(one("jsonok"), "--response-format", "json_object")
    assert res.code == 0, res.stderr
    assert only_request(gw).body["response_format"] == {"type": "json_object"}
    r = row(res, "r1")
    assert r["status"] == "ok" and r["attempts"] == 1
    assert r["json_valid"] is True
    assert json.loads(r["caption_json"]) == JSON_DOC
    assert r["caption_json"] != JSON_TEXT and r["caption_json"] == r["caption_json"].strip()
    assert "\n" not in r["caption_json"]  # re-serialized, not the model's layout
    assert json.loads(r["caption"]) == JSON_DOC


def test_json_mode_invalid_text_is_retried_then_an_error_row(caption, gw):
    res = caption(one("jsonbad"), "--response-format", "json_object", retries=2)
    assert res.code == 1, res.stderr
    assert gw.count() == 3
    r = row(res, "r1")
    assert r["status"] == "error"
    assert r["error_class"] == "invalid_json"
    assert r["json_valid"] is False
    assert r["attempts"] == 3
    assert r["caption_json"] is None


def test_json_mode_invalid_row_is_captioned_by_retry_errors(caption, gw):
    JSON_MODE["valid"] = False
    try:
        first = caption(one("jsonflip"), "--response-format", "json_object", retries=0)
        assert first.code == 1, first.stderr
        assert row(first, "r1")["error_class"] == "invalid_json"
        JSON_MODE["valid"] = True
        again = caption(one("jsonflip"), "--response-format", "json_object", "--retry-errors",
                        retries=0)
    finally:
        JSON_MODE["valid"] = True
    assert again.code == 0, again.stderr
    assert gw.count() == 2
    r = row(again, "r1")
    assert r["status"] == "ok" and r["json_valid"] is True
    assert json.loads(r["caption_json"]) == JSON_DOC


def test_json_mode_nan_is_not_valid_json(caption, gw):
    res = caption(one("jsonnan"), "--response-format", "json_object", retries=0)
    r = row(res, "r1")
    if r["caption_json"] is not None:  # whatever is stored must be real JSON
        json.loads(r["caption_json"], parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert r["json_valid"] is False and r["error_class"] == "invalid_json"


# --------------------------------------------------------------------------- n > 1


def test_n2_interleaved_choices_are_accumulated_by_index(caption, gw):
    res = caption(one("n2"), "--n", "2")
    assert res.code == 0, res.stderr
    assert only_request(gw).body["n"] == 2
    r = row(res, "r1")
    t0, t1 = ("".join(t) for t in N2_TEXTS)
    assert r["status"] == "ok", r
    assert r["captions"] == [t0, t1]
    assert r["caption"] == t0
    assert r["finish_reason"] == "stop"
    assert (r["prompt_tokens"], r["completion_tokens"]) == (1000, 20)
    assert r["attempts"] == 1


def test_n2_choice_that_never_finishes_is_retried(caption, gw):
    res = caption(one("n2open"), "--n", "2", retries=2)
    assert res.code == 0, res.stderr
    assert gw.count() == 2
    r = row(res, "r1")
    assert r["status"] == "ok" and r["attempts"] == 2
    assert r["captions"] == ["".join(t) for t in N2_RETRY_TEXTS]
    assert r["caption"] == "".join(N2_RETRY_TEXTS[0])
    for piece in N2_TEXTS[0] + N2_TEXTS[1]:  # nothing of the failed attempt is kept
        assert piece.strip() not in "".join(r["captions"])


# --------------------------------------------------------------------------- prompt templates


def test_prompt_template_is_filled_per_row(caption, gw):
    rows = [{"id": "a", "image": img("opt", "a.jpg"), "category": "street"},
            {"id": "b", "image": img("opt", "b.jpg"), "category": "wildlife"},
            {"id": "c", "image": img("opt", "c.jpg"), "category": "food, plated"}]
    res = caption(rows, "--prompt", "Describe this {category} photo ({id})")
    assert res.code == 0, res.stderr
    sent = {r.url: r.prompt_text for r in gw.calls()}
    assert sent == {img("opt", "a.jpg"): "Describe this street photo (a)",
                    img("opt", "b.jpg"): "Describe this wildlife photo (b)",
                    img("opt", "c.jpg"): "Describe this food, plated photo (c)"}
    assert sorted(res.ids) == ["a", "b", "c"]
    assert row(res, "b")["category"] == "wildlife"


def test_prompt_template_with_missing_column_exits_2_before_any_request(caption, gw):
    rows = [{"id": "a", "image": img("opt", "a.jpg"), "category": "street"}]
    res = caption(rows, "--prompt", "Describe this {colour} photo")
    assert_rejected_before_any_request(res, gw, mentions="colour")


def test_prompt_template_naming_the_prompt_column_is_filled_or_rejected_up_front(caption, gw):
    rows = [{"id": "a", "image": img("opt", "a.jpg"), "prompt": "Own prompt", "tag": "x"},
            {"id": "b", "image": img("opt", "b.jpg"), "prompt": "", "tag": "y"}]
    res = caption(rows, "--prompt", "Caption ({prompt}) tag {tag}", concurrency=1)
    if res.code == 2:  # rejected: then up front, clearly, and nothing sent
        assert_rejected_before_any_request(res, gw, mentions="{prompt}")
    else:
        assert res.code == 0, res.stderr
        sent = {r.url: r.prompt_text for r in gw.calls()}
        assert sent[img("opt", "a.jpg")] == "Own prompt"
        assert sent[img("opt", "b.jpg")] == "Caption () tag y"


# --------------------------------------------------------------------------- Anthropic server

ANTHROPIC_KEY = "sk-ant-test-0077"


def awkward(body: bytes, *marks: bytes) -> list[bytes]:
    """Cut ``body`` into pieces of 1, 3, 7, 2, 11 bytes (cycling), plus a cut inside each
    occurrence of every ``marks`` byte string (mid UTF-8 character, mid field name...)."""
    cuts: set[int] = set()
    i, sizes = 0, (1, 3, 7, 2, 11)
    while i < len(body):
        i += sizes[len(cuts) % len(sizes)]
        cuts.add(i)
    for m in marks:
        start = body.find(m)
        while start >= 0:
            cuts.add(start + max(1, len(m) // 2))
            start = body.find(m, start + 1)
    edges = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:])]


@pytest.fixture
def anthropic(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("CAPTION_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    with AnthropicGateway() as server:
        yield server


def a_caption(caption: Any, server: AnthropicGateway, rows: Any, *args: str,
              **kw: Any) -> Any:
    return caption(rows, "--api", "anthropic", "--model", A_MODEL, *args,
                   base_url=server.base_url, **kw)


def small_png(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    Image.new("RGB", size, (200, 40, 90)).save(path, format="PNG")
    return path


REMOTE = "http://img.test/remote/photo.jpg"


def test_anthropic_request_headers_and_body(caption, gw, anthropic, tmp_path):
    small_png(tmp_path / "pic.png")
    anthropic.script = lambda req: a_stream(
        ["A remote photo."] if req.key == REMOTE else ["A local picture."])
    rows = [{"id": "local", "image": "pic.png"}, {"id": "remote", "image": REMOTE}]
    res = a_caption(caption, anthropic, rows, "--stop", "END", "--stop", "\n\nHuman:",
                    "--user", "user-42", "--temperature", "0.4", "--top-p", "0.8",
                    "--max-tokens", "222", "--system", "Be terse.", "--prompt", "Caption it.")
    assert res.code == 0, res.stderr
    assert gw.count() == 0
    reqs = {("local" if r.key.startswith("b64:") else "remote"): r for r in anthropic.messages}
    assert sorted(reqs) == ["local", "remote"] and len(anthropic.messages) == 2
    for req in reqs.values():
        assert (req.method, req.path) == ("POST", "/v1/messages")
        assert req.header("x-api-key") == ANTHROPIC_KEY
        assert req.header("anthropic-version") == A_VERSION
        assert req.header("authorization") is None
        b = req.body
        assert b["model"] == A_MODEL and b["stream"] is True and b["max_tokens"] == 222
        assert b["stop_sequences"] == ["END", "\n\nHuman:"]
        assert b["metadata"] == {"user_id": "user-42"}
        assert (b["temperature"], b["top_p"]) == (0.4, 0.8)
        assert b["system"] == "Be terse."
        for k in ("stop", "user", "n", "seed", "stream_options", "response_format"):
            assert k not in b, k
        kinds = [blk["type"] for blk in req.content]
        assert sorted(kinds) == ["image", "text"], kinds
        (text,) = [blk for blk in req.content if blk["type"] == "text"]
        assert text["text"] == "Caption it."

    (local_img,) = [b for b in reqs["local"].content if b["type"] == "image"]
    src = local_img["source"]
    assert src["type"] == "base64"
    assert not src["data"].startswith("data:")
    decoded = Image.open(io.BytesIO(base64.b64decode(src["data"], validate=True)))
    assert decoded.size == (64, 48)
    assert src["media_type"] == Image.MIME[decoded.format]
    (remote_img,) = [b for b in reqs["remote"].content if b["type"] == "image"]
    assert remote_img["source"] == {"type": "url", "url": REMOTE}

    assert row(res, "local")["caption"] == "A local picture."
    assert row(res, "remote")["caption"] == "A remote photo."


def test_anthropic_caption_api_key_wins_over_anthropic_api_key(caption, gw, anthropic,
                                                               monkeypatch):
    monkeypatch.setenv("CAPTION_API_KEY", API_KEY)
    res = a_caption(caption, anthropic, [{"id": "r1", "image": REMOTE}])
    assert res.code == 0, res.stderr
    (req,) = anthropic.messages
    assert req.header("x-api-key") == API_KEY


A_TEXTS = ["Café ☕", " on a", " rainy", " morning, 世界."]


def test_anthropic_stream_with_pings_split_at_awkward_boundaries(caption, gw, anthropic):
    def script(req: ARequest) -> list[bytes]:
        body = b"".join(a_stream(A_TEXTS, msg_id="msg_awk", input_tokens=1523,
                                 output_tokens=17))
        assert body.count(b"event: ping") == len(A_TEXTS) + 1
        return awkward(body, "☕".encode(), "世".encode(), b"event: ping", b"\n\n",
                       b"content_block_delta", b'"usage"')

    anthropic.script = script
    res = a_caption(caption, anthropic, [{"id": "r1", "image": REMOTE}], retries=0)
    assert res.code == 0, res.stderr
    r = row(res, "r1")
    assert r["status"] == "ok", r
    assert r["caption"] == "".join(A_TEXTS)
    assert r["captions"] == ["".join(A_TEXTS)]
    assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (1523, 17, 1540)
    assert r["finish_reason"] == "stop" and r["finish_reason_raw"] == "end_turn"
    assert r["response_id"] == "msg_awk" and r["model"] == A_MODEL
    assert r["attempts"] == 1


def test_anthropic_mid_stream_error_event_is_retried(caption, gw, anthropic):
    overloaded = a_event("error", {"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}})

    def script(req: ARequest) -> list[bytes]:
        if req.attempt == 1:
            return [a_start("msg_first", 999), PING, a_delta("PARTIAL first"), PING,
                    a_delta(" attempt"), overloaded]
        return a_stream(["Second attempt", " caption."], msg_id="msg_second",
                        input_tokens=1200, output_tokens=6)

    anthropic.script = script
    res = a_caption(caption, anthropic, [{"id": "r1", "image": REMOTE}], retries=2)
    assert res.code == 0, res.stderr
    assert len(anthropic.messages) == 2
    r = row(res, "r1")
    assert r["status"] == "ok" and r["attempts"] == 2
    assert r["caption"] == "Second attempt caption."
    assert "PARTIAL" not in r["caption"] and "attempt attempt" not in r["caption"]
    assert r["response_id"] == "msg_second"
    assert (r["prompt_tokens"], r["completion_tokens"]) == (1200, 6)


@pytest.mark.parametrize("argv, mentions", [
    pytest.param(["--seed", "7"], "--seed", id="seed"),
    pytest.param(["--n", "2"], "--n", id="n-2"),
    pytest.param(["--presence-penalty", "0.5"], "--presence-penalty", id="presence-penalty"),
    pytest.param(["--logit-bias", '{"1": 5}'], "--logit-bias", id="logit-bias"),
    pytest.param(["--response-format", "json_object"], "--response-format",
                 id="response-format"),
])
def test_anthropic_rejects_openai_only_options_before_any_request(caption, gw, anthropic,
                                                                  argv, mentions):
    res = a_caption(caption, anthropic, [{"id": "r1", "image": REMOTE}], *argv)
    assert_rejected_before_any_request(res, gw, anthropic, mentions=mentions)
    assert "anthropic" in res.stderr_lines()[0]


def test_awkward_split_keeps_every_byte_once() -> None:
    """The splitter the stream test relies on loses and duplicates nothing."""
    body = "event: ping\n\ndata: ☕\n\n".encode() * 20
    pieces = awkward(body, "☕".encode(), b"\n\n")
    assert b"".join(pieces) == body and all(pieces)
    assert max(len(p) for p in pieces) <= 11
    assert any(p.endswith("☕".encode()[:1]) for p in pieces)  # a cut inside the character
