"""What a simulated batch does with its requests: answer each one as the online path would.

A batch's requests are answered in the background after ``create`` (the same request
parsing, captions and usage as ``POST /v1/chat/completions`` and ``/v1/messages`` with
``stream: false``), and revealed when the batch ends. Each request may be hit by a
partial failure (an ``api_error`` / HTTP 500 result) or be left unfinished at expiry
(``expire_rate``); results come out shuffled unless ``in_order`` is asked for, because
neither provider promises request order (docs/protocol.md §17).
"""

from __future__ import annotations

import json
import random
import secrets
from dataclasses import dataclass, field
from typing import Any

from .answers import choices_for  # the online routes' answers: same captions either lane
from .anthropic import ANTHROPIC
from .captions import BadRequest
from .wire import OPENAI, Dialect

__all__ = ["Answer", "BatchConfig", "answer_all"]

MAX_CUSTOM_ID = 64


@dataclass(frozen=True)
class BatchConfig:
    """The batch APIs' scenario knobs (``simulate --batch-*``)."""

    delay: float = 0.0           # seconds from create until a batch ends
    fail_rate: float = 0.0       # fraction of requests that end as a server error
    expire_rate: float = 0.0     # fraction of requests left unfinished: the batch expires
    in_order: bool = False       # results in request order (default: shuffled)
    max_bytes: int = 200 * 1024 * 1024  # larger input file / create body: HTTP 413
    max_requests: int = 50_000
    upload_hold: float = 0.0     # seconds an upload waits before it is stored (tests kill
    upload_delay: float = 0.0    # the client before an effect, or between the effect
    create_delay: float = 0.0    # and its answer: held back this long)
    line_delay: float = 0.0      # seconds between result lines when they are downloaded

    def __post_init__(self) -> None:
        for name in ("delay", "upload_hold", "upload_delay", "create_delay", "line_delay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"batch {name} must be >= 0")
        for name in ("fail_rate", "expire_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"batch {name} must be between 0 and 1")
        if self.max_bytes < 1 or self.max_requests < 1:
            raise ValueError("batch max_bytes and max_requests must be >= 1")


@dataclass
class Answer:
    """One request's outcome: a success body, an error (status + body), or none yet."""

    custom_id: str
    status: int = 0               # 0: not run (expired / canceled)
    body: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _error_body(dialect: Dialect, status: int, message: str) -> dict[str, Any]:
    if dialect is ANTHROPIC:
        kind = "invalid_request_error" if status == 400 else "api_error"
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = "invalid_request_error" if status == 400 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _answer(dialect: Dialect, custom_id: str, params: Any, config: Any, seed: int,
                  fate: str | None) -> Answer:
    if fate == "expire":
        return Answer(custom_id)
    if fate == "fail":
        return Answer(custom_id, 500, _error_body(dialect, 500, "The server had an error "
                                                  "while processing your request."))
    try:
        if not isinstance(params, dict):
            raise BadRequest("the request body is not a JSON object")
        if params.get("stream"):
            raise BadRequest("stream is not supported in a batch", "stream")
        job = await dialect.parse(params, config, f"req_{secrets.token_hex(12)}")
    except BadRequest as e:
        return Answer(custom_id, 400, _error_body(dialect, 400, e.message))
    choices = choices_for(job, seed)
    body = dialect.body(job, choices, finished=True)
    return Answer(custom_id, 200, body, job.prompt.tokens,
                  sum(max(1, len(c.pieces)) for c in choices))


async def answer_all(dialect: Dialect, requests: list[tuple[str, Any]], config: Any,
                     batch: BatchConfig, rng: random.Random, seed: int) -> list[Answer]:
    """Every request's answer, in the order results will be served."""
    answers = []
    for custom_id, params in requests:
        roll = rng.random()  # one draw per request: request k meets the same fate
        fate = "fail" if roll < batch.fail_rate else \
            "expire" if roll < batch.fail_rate + batch.expire_rate else None
        answers.append(await _answer(dialect, custom_id, params, config, seed, fate))
    if not batch.in_order:
        rng.shuffle(answers)
    return answers


def openai_line(a: Answer, cancelled: bool, expired: bool) -> tuple[str, bytes]:
    """(``output`` or ``error``, the JSONL line) of one request in OpenAI's files."""
    rid = f"batch_req_{secrets.token_hex(8)}"
    if a.status == 0:
        code = "batch_cancelled" if cancelled else "batch_expired"
        doc: dict[str, Any] = {"id": rid, "custom_id": a.custom_id, "response": None,
               "error": {"code": code, "message": "This request could not be executed "
                         "before the batch " + ("was cancelled." if cancelled else
                                                "expired.")}}
        return "error", _line(doc)
    ok: dict[str, Any] = {"id": rid, "custom_id": a.custom_id, "error": None,
           "response": {"status_code": a.status, "request_id": f"req_{secrets.token_hex(8)}",
                        "body": a.body}}
    return ("output" if a.status == 200 else "error"), _line(ok)


def anthropic_line(a: Answer, cancelled: bool) -> bytes:
    if a.status == 0:
        result: dict[str, Any] = {"type": "canceled" if cancelled else "expired"}
    elif a.status == 200:
        result = {"type": "succeeded", "message": a.body}
    else:
        result = {"type": "errored", "error": a.body}
    return _line({"custom_id": a.custom_id, "result": result})


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


DIALECTS: dict[str, Dialect] = {"openai": OPENAI, "anthropic": ANTHROPIC}
