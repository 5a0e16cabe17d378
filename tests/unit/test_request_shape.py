"""Specification of what goes on the wire: the POST Worker + Transport make for one row.

Wired as pipeline/runner.py wires them (Worker(settings, adapter, transport,
ImageSource(...), <pacing>, RetryPolicy(...)), where the pacing object is a
``ratelimit.Limiter`` since commit 8ecded0 and was a bare ``PauseGate`` before);
aioresponses intercepts the POST, so the test sees the exact URL, headers and JSON
body, and answers with a canned response. The request must follow
docs/protocol.md §2.1. Sleeps are injected: no test waits on the wall clock.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL

from pipeline.images.load import ImageSource
from pipeline.images.prepare import ImagePolicy
from pipeline.pacing import limiter as ratelimit
from pipeline.pacing.retry import RetryPolicy
from pipeline.records import ManifestRow
from pipeline.run.worker import Worker
from pipeline.settings import Secret, Settings
from pipeline.wire.adapters import get_adapter
from pipeline.wire.options import RequestOptions
from pipeline.wire.transport import Transport

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "sample"
BASE_URL = "http://gateway.test/v1"
URL_CHAT = BASE_URL + "/chat/completions"
KEY = "sk-unit-test-7f3a"

SSE_OK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"A horse in a field."},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o-mini",'
    b'"choices":[],"usage":{"prompt_tokens":120,"completion_tokens":6,"total_tokens":126}}\n\n'
    b"data: [DONE]\n\n"
)


class CompatResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds ClientResponse without the ``stream_writer`` argument
    that aiohttp 3.14 requires (pnuckowski/aioresponses#289); supply a stand-in."""

    def __init__(self, method: str, url: URL, **kw: Any) -> None:
        kw.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kw)


def answer(m: aioresponses, status: int = 200, body: bytes = SSE_OK,
           content_type: str = "text/event-stream") -> None:
    m.post(URL_CHAT, status=status, body=body, content_type=content_type,
           response_class=CompatResponse)


def settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(manifest=SAMPLES / "images.csv", out=tmp_path / "out",
                                base_url=BASE_URL, api_key=Secret(KEY), model="gpt-4o-mini",
                                max_tokens=300, retries=3)
    base.update(kw)
    if "temperature" in base:  # sampling options live in RequestOptions
        base["options"] = RequestOptions(temperature=base.pop("temperature"))
    return Settings(**base)


def row(image: str = "horse.png", prompt: str | None = None) -> ManifestRow:
    return ManifestRow("horse", image, prompt, 2, {"source": "x"})


class Harness:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.sleeps: list[float] = []
        adapter = get_adapter(s.api)
        self.transport = Transport(s.endpoint, adapter.auth_headers(s.api_key.reveal()),
                                   s.concurrency, s.connect_timeout, s.read_timeout)

        async def fake_sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.worker = Worker(s, adapter, self.transport,
                             ImageSource(s.manifest.parent,
                                         ImagePolicy(max_bytes=s.max_image_bytes)),
                             pacing(s, fake_sleep),
                             RetryPolicy(s.retries, s.backoff_base, s.backoff_max,
                                         s.max_retry_after, rand=lambda: 0.5),
                             sleep=fake_sleep)


def pacing(s: Settings, sleep: Any) -> Any:
    """What runner.py hands the worker: a Limiter (or, in older code, a PauseGate)."""
    if hasattr(ratelimit, "Limiter"):
        return ratelimit.Limiter(ratelimit.Budgets(s.rpm, s.tpm, s.itpm, s.otpm),
                                 s.concurrency, sleep=sleep)
    return ratelimit.PauseGate(sleep=sleep)


@pytest.fixture
def mocked() -> Any:
    with aioresponses() as m:
        yield m


def calls(m: aioresponses) -> list[Any]:
    return m.requests.get(("POST", URL(URL_CHAT)), [])


def sent_json(m: aioresponses, i: int = 0) -> dict[str, Any]:
    data = calls(m)[i].kwargs["data"]
    return json.loads(data)


def sent_headers(m: aioresponses, i: int = 0) -> dict[str, str]:
    return {k.lower(): v for k, v in calls(m)[i].kwargs["headers"].items()}


async def process(tmp_path: Path, m: aioresponses, r: ManifestRow | None = None,
                  status: int = 200, body: bytes = SSE_OK,
                  content_type: str = "text/event-stream", **kw: Any) -> dict[str, Any]:
    answer(m, status, body, content_type)
    h = Harness(settings(tmp_path, **kw))
    async with h.transport:
        return await h.worker.process(r or row())


@pytest.fixture
async def ok_request(tmp_path: Path, mocked: aioresponses) -> AsyncIterator[dict[str, Any]]:
    result = await process(tmp_path, mocked, system="You caption photos.")
    yield {"result": result, "body": sent_json(mocked), "headers": sent_headers(mocked)}


# --------------------------------------------------------------------------- body


async def test_posts_once_to_base_url_plus_chat_completions(tmp_path: Path,
                                                            mocked: aioresponses) -> None:
    await process(tmp_path, mocked)
    assert list(mocked.requests) == [("POST", URL(URL_CHAT))]
    assert len(calls(mocked)) == 1


async def test_body_names_the_model(ok_request: dict[str, Any]) -> None:
    assert ok_request["body"]["model"] == "gpt-4o-mini"


async def test_body_asks_for_a_stream_with_usage(ok_request: dict[str, Any]) -> None:
    body = ok_request["body"]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_body_carries_max_tokens(ok_request: dict[str, Any]) -> None:
    assert ok_request["body"]["max_tokens"] == 300


async def test_body_has_no_n(ok_request: dict[str, Any]) -> None:
    assert "n" not in ok_request["body"]


async def test_system_prompt_is_the_first_message(ok_request: dict[str, Any]) -> None:
    assert ok_request["body"]["messages"][0] == {"role": "system",
                                                 "content": "You caption photos."}


async def test_user_message_is_text_part_then_image_url_part(ok_request: dict[str, Any]) -> None:
    messages = ok_request["body"]["messages"]
    assert len(messages) == 2
    user = messages[1]
    assert user["role"] == "user"
    text, image = user["content"]
    assert text["type"] == "text" and text["text"].startswith("Write one factual caption")
    assert image["type"] == "image_url"
    assert set(image["image_url"]) == {"url"}


async def test_image_is_sent_as_a_data_uri_of_the_file(ok_request: dict[str, Any]) -> None:
    url = ok_request["body"]["messages"][1]["content"][1]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    assert base64.b64decode(url[len(prefix):]) == (SAMPLES / "horse.png").read_bytes()


async def test_temperature_is_absent_unless_set(ok_request: dict[str, Any]) -> None:
    assert "temperature" not in ok_request["body"]


async def test_temperature_is_sent_when_set(tmp_path: Path, mocked: aioresponses) -> None:
    await process(tmp_path, mocked, temperature=0.2)
    assert sent_json(mocked)["temperature"] == 0.2


async def test_temperature_zero_is_sent(tmp_path: Path, mocked: aioresponses) -> None:
    await process(tmp_path, mocked, temperature=0.0)
    assert sent_json(mocked)["temperature"] == 0.0


async def test_no_system_message_without_a_system_prompt(tmp_path: Path,
                                                         mocked: aioresponses) -> None:
    await process(tmp_path, mocked)
    assert [m["role"] for m in sent_json(mocked)["messages"]] == ["user"]


async def test_row_prompt_overrides_the_run_prompt(tmp_path: Path, mocked: aioresponses) -> None:
    await process(tmp_path, mocked, row(prompt="Name the animal."), prompt="Run prompt.")
    assert sent_json(mocked)["messages"][0]["content"][0] == {"type": "text",
                                                              "text": "Name the animal."}


async def test_run_prompt_is_used_when_the_row_has_none(tmp_path: Path,
                                                        mocked: aioresponses) -> None:
    await process(tmp_path, mocked, prompt="Run prompt.")
    assert sent_json(mocked)["messages"][0]["content"][0]["text"] == "Run prompt."


async def test_http_image_url_is_sent_as_given(tmp_path: Path, mocked: aioresponses) -> None:
    url = "https://images.example/horse.png?sig=1"
    await process(tmp_path, mocked, row(image=url))
    assert sent_json(mocked)["messages"][0]["content"][1]["image_url"]["url"] == url


async def test_non_ascii_prompt_is_sent_as_utf8(tmp_path: Path, mocked: aioresponses) -> None:
    await process(tmp_path, mocked, row(prompt="Décris l'image — 日本語で"))
    raw = calls(mocked)[0].kwargs["data"]
    assert "日本語で".encode() in raw
    assert json.loads(raw)["messages"][0]["content"][0]["text"] == "Décris l'image — 日本語で"


# --------------------------------------------------------------------------- headers


async def test_authorization_is_a_bearer_of_the_api_key(ok_request: dict[str, Any]) -> None:
    assert ok_request["headers"]["authorization"] == f"Bearer {KEY}"


async def test_content_type_is_json_and_accept_is_event_stream(
        ok_request: dict[str, Any]) -> None:
    assert ok_request["headers"]["content-type"] == "application/json"
    assert ok_request["headers"]["accept"] == "text/event-stream"


async def test_api_key_is_not_in_the_body(ok_request: dict[str, Any]) -> None:
    assert KEY not in json.dumps(ok_request["body"])


async def test_no_authorization_header_without_a_key(tmp_path: Path,
                                                     mocked: aioresponses) -> None:
    await process(tmp_path, mocked, api_key=Secret(""))
    assert "authorization" not in sent_headers(mocked)


# --------------------------------------------------------------------------- outcomes


async def test_streamed_answer_becomes_an_ok_row(ok_request: dict[str, Any]) -> None:
    r = ok_request["result"]
    assert r.status == "ok"
    assert r.caption == "A horse in a field."
    assert r.attempts == 1 and r.http_status == 200
    assert (r.prompt_tokens, r.completion_tokens) == (120, 6)


async def test_400_returns_an_error_row_with_one_attempt(tmp_path: Path,
                                                         mocked: aioresponses) -> None:
    body = json.dumps({"error": {"message": "Unrecognized request argument supplied: foo",
                                 "type": "invalid_request_error"}}).encode()
    r = await process(tmp_path, mocked, status=400, body=body, content_type="application/json")
    assert r.status == "error"
    assert r.attempts == 1
    assert r.http_status == 400
    assert r.error_class == "bad_request"
    assert "Unrecognized request argument" in r.error
    assert len(calls(mocked)) == 1


async def test_400_image_error_is_a_bad_image_row_without_retry(tmp_path: Path,
                                                                mocked: aioresponses) -> None:
    body = json.dumps({"error": {"message": "Invalid image.", "type":
                                 "invalid_request_error"}}).encode()
    r = await process(tmp_path, mocked, status=400, body=body, content_type="application/json")
    assert (r.status, r.error_class, r.attempts) == ("error", "bad_image", 1)
    assert len(calls(mocked)) == 1


async def test_local_image_problem_sends_no_request(tmp_path: Path,
                                                    mocked: aioresponses) -> None:
    h = Harness(settings(tmp_path))
    async with h.transport:
        r = await h.worker.process(row(image="missing.png"))
    assert (r.status, r.error_class, r.attempts) == ("error", "bad_image", 0)
    assert calls(mocked) == []


async def test_500_then_success_is_retried_with_the_same_body(tmp_path: Path,
                                                              mocked: aioresponses) -> None:
    answer(mocked, 500, b'{"error":{"message":"boom"}}', "application/json")
    answer(mocked)
    h = Harness(settings(tmp_path))
    async with h.transport:
        r = await h.worker.process(row())
    assert (r.status, r.attempts) == ("ok", 2)
    assert len(calls(mocked)) == 2
    assert calls(mocked)[0].kwargs["data"] == calls(mocked)[1].kwargs["data"]
    assert h.sleeps == [0.75]  # step 1 within [0.5, 1] x base 1.0, rand 0.5; no wall clock
