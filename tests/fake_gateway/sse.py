"""Bytes of the OpenAI-compatible wire, for fake servers to send: chunks, events, bodies.

The sequences follow docs/protocol.md §1, §2 and §10 (the conformance cases); the
constants are what the scenarios send and the tests expect back.
"""

from __future__ import annotations

import base64
import email.utils
import json
import time
from typing import Any
from urllib.parse import urlsplit

MODEL = "gpt-4o-mini-2024-07-18"
RETRY_CAPTION = "Second attempt caption."
LOCAL_CAPTION = "A local image."
PARTIAL = ["PARTIAL-ONE", " PARTIAL-TWO"]  # text of failed attempts; must never be kept
USAGE_C01 = {"prompt_tokens": 1200, "completion_tokens": 7, "total_tokens": 1207,
             "prompt_tokens_details": {"cached_tokens": 0}}
USAGE_OK = {"prompt_tokens": 1000, "completion_tokens": 5, "total_tokens": 1005}


def img(scenario: str, name: str = "a.jpg", **query: Any) -> str:
    """A pass-through image URL that selects ``scenario`` (knobs go in the query)."""
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"http://img.test/{scenario}/{name}" + (f"?{q}" if q else "")


def default_caption(url: str) -> str:
    """The caption the ``ok``/``slow`` scenarios return for an image URL."""
    return f"Caption of {urlsplit(url).path}"


# --------------------------------------------------------------------------- chunks


def chunk(content: str | None = None, *, finish: str | None = None, role: bool = False,
          usage: Any = None, cid: str = "chatcmpl-fake01", model: str = MODEL,
          index: int = 0, delta: dict | None = None, with_usage_key: bool = True,
          **top: Any) -> dict:
    """One ``chat.completion.chunk`` with a single choice."""
    d: dict[str, Any] = dict(delta or {})
    if role:
        d["role"] = "assistant"
    if content is not None:
        d["content"] = content
    out: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": 1767225600, "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{"index": index, "delta": d, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage_key or usage is not None:
        out["usage"] = usage
    out.update(top)
    return out


def usage_chunk(usage: dict, *, cid: str = "chatcmpl-fake01") -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": 1767225600,
            "model": MODEL, "choices": [], "usage": usage}


def sse(obj: Any, *, nl: str = "\n", space: bool = True, ascii: bool = True) -> bytes:
    """One SSE event: ``data: <json>`` plus a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=ascii,
                                                       separators=(",", ":"))
    return f"data:{' ' if space else ''}{data}{nl}{nl}".encode()


def done(*, nl: str = "\n", space: bool = True) -> bytes:
    return sse("[DONE]", nl=nl, space=space)


def standard_events(texts: list[str], *, finish: str = "stop", usage: dict | None = USAGE_C01,
                    cid: str = "chatcmpl-fake01") -> list[dict]:
    """Role chunk, one chunk per text, finish chunk, usage chunk (if any)."""
    evs = [chunk("", role=True, cid=cid)]
    evs += [chunk(t, cid=cid) for t in texts]
    evs.append(chunk(None, finish=finish, cid=cid))
    if usage is not None:
        evs.append(usage_chunk(usage, cid=cid))
    return evs


def stream_body(texts: list[str], *, finish: str = "stop", usage: dict | None = USAGE_C01,
                with_done: bool = True, nl: str = "\n", space: bool = True,
                ascii: bool = True, cid: str = "chatcmpl-fake01") -> bytes:
    body = b"".join(sse(e, nl=nl, space=space, ascii=ascii)
                    for e in standard_events(texts, finish=finish, usage=usage, cid=cid))
    return body + (done(nl=nl, space=space) if with_done else b"")


def split_after(data: bytes, sep: bytes) -> list[bytes]:
    """Cut ``data`` just after every occurrence of ``sep`` (e.g. between CR and LF)."""
    out, start = [], 0
    while True:
        i = data.find(sep, start)
        if i < 0:
            break
        out.append(data[start:i + len(sep)])
        start = i + len(sep)
    if start < len(data):
        out.append(data[start:])
    return out


def http_date(seconds_ahead: float) -> str:
    return email.utils.formatdate(time.time() + seconds_ahead, usegmt=True)


def decode_data_uri(url: str) -> tuple[str, bytes]:
    """(mime, bytes) of a ``data:<mime>;base64,<payload>`` URI."""
    head, _, payload = url.partition(",")
    mime = head[len("data:"):].split(";", 1)[0]
    return mime, base64.b64decode(payload)
