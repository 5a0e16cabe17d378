"""The nouns passed between stages, and the one Arrow schema of the output.

ManifestRow → PreparedImage → ApiRequest → Completion → result row (a dict that
matches ``output_schema``). Every manifest row ends as exactly one result row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

DEFAULT_PROMPT_NAME = "default"

# Fixed columns, in order; the manifest's extra columns (strings) follow them.
BASE_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string()),
    pa.field("prompt_name", pa.string()),
    pa.field("image", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("captions", pa.list_(pa.string())),
    pa.field("caption_json", pa.string()),
    pa.field("json_valid", pa.bool_()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("error_class", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("finish_reason_raw", pa.string()),
    pa.field("model", pa.string()),
    pa.field("prompt_sha256", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("usage_source", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("latency_s", pa.float64()),
    pa.field("ttft_s", pa.float64()),
    pa.field("request_id", pa.string()),
    pa.field("response_id", pa.string()),
    pa.field("http_status", pa.int32()),
    pa.field("retry_after_s", pa.float64()),
    pa.field("terminal", pa.string()),
    pa.field("quirks", pa.string()),
    pa.field("line", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("sent_width", pa.int32()),
    pa.field("sent_height", pa.int32()),
    pa.field("sent_bytes", pa.int64()),
    pa.field("image_sha256", pa.string()),
    pa.field("dedup_key", pa.string()),
    pa.field("dedup_of", pa.string()),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
]
BASE_NAMES = frozenset(f.name for f in BASE_FIELDS)


def output_schema(extra_columns: list[str]) -> pa.Schema:
    extras = [pa.field(c, pa.string()) for c in extra_columns if c not in BASE_NAMES]
    return pa.schema(BASE_FIELDS + extras)


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """One manifest line. ``error`` is set when the line itself is unusable."""

    id: str
    image: str
    prompt: str | None
    line: int
    extra: dict[str, str | None]
    prompt_name: str = DEFAULT_PROMPT_NAME
    error: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.id, self.prompt_name)


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """What is actually sent: a data URI (local files) or a pass-through URL."""

    url: str
    mime: str | None
    sent_bytes: int | None
    width: int | None = None    # as sent; None for a pass-through URL
    height: int | None = None
    orig_width: int | None = None   # the original, after EXIF orientation
    orig_height: int | None = None
    sha256: str | None = None       # of the original bytes; None when never downloaded

    def columns(self) -> dict[str, object]:
        return {"width": self.orig_width, "height": self.orig_height,
                "sent_width": self.width, "sent_height": self.height,
                "sent_bytes": self.sent_bytes, "image_sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """A request body ready to send; holds no secret (auth is added at send time)."""

    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    est_input_tokens: int = 0   # for the token budgets; reconciled with reported usage
    est_output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """The outcome of one successful attempt."""

    text: str
    finish_reason: str
    finish_reason_raw: str
    model: str | None
    response_id: str | None
    usage: Usage | None
    terminal: str
    quirks: dict[str, int]
    texts: tuple[str, ...] = ()  # every choice, in index order, when n > 1


def prompt_sha256(system: str | None, prompt: str) -> str:
    """The hash of what was asked: the system message and the user prompt as sent."""
    text = json.dumps([system, prompt], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def now_utc() -> datetime:
    return datetime.now(UTC)


def base_row(row: ManifestRow) -> dict[str, Any]:
    out: dict[str, Any] = {name: None for name in BASE_NAMES}
    out.update(row.extra)
    out.update(id=row.id, prompt_name=row.prompt_name, image=row.image, line=row.line,
               attempts=0)
    return out


def ok_row(row: ManifestRow, c: Completion, **timing: Any) -> dict[str, Any]:
    out = base_row(row)
    u = c.usage
    out.update(
        caption=c.text, captions=list(c.texts) if c.texts else [c.text], status="ok",
        finish_reason=c.finish_reason,
        finish_reason_raw=c.finish_reason_raw, model=c.model, response_id=c.response_id,
        terminal=c.terminal, usage_source="reported" if u else "absent",
        quirks=json.dumps(c.quirks, sort_keys=True) if c.quirks else None,
        finished_at=now_utc(),
    )
    if u:
        out.update(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                   total_tokens=u.total_tokens, cached_tokens=u.cached_tokens)
    out.update(timing)
    return out


def copied_row(row: ManifestRow, original: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A duplicate image: the caption of the row that was captioned, no tokens spent."""
    out = base_row(row)
    out.update({k: v for k, v in original.items() if k != "id" and k != "dedup_key"})
    out.update(status="ok", dedup_of=original["id"], usage_source="dedup",
               cost_usd=0.0, finished_at=now_utc())  # no request, so no cost: 0, not unknown
    out.update(extra)
    return out


def error_row(row: ManifestRow, message: str, error_class: str, **timing: Any) -> dict[str, Any]:
    out = base_row(row)
    out.update(status="error", error=message, error_class=error_class, finished_at=now_utc())
    out.update(timing)
    return out
