"""The nouns passed between stages, and the one Arrow schema of the output.

ManifestRow → PreparedImage → ApiRequest → Completion → result row (a dict that
matches ``output_schema``). Every manifest row ends as exactly one result row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import pyarrow as pa

DEFAULT_PROMPT_NAME = "default"
_TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """One manifest line (or record of another source). ``error`` is set when the
    record itself is unusable. ``data`` holds an image embedded in the source (a
    Parquet image struct, a WebDataset member): it is prepared like a file's bytes and
    never written to OUT (``image`` names where it came from)."""

    id: str
    image: str
    prompt: str | None
    line: int
    extra: dict[str, str | None]
    prompt_name: str = DEFAULT_PROMPT_NAME
    error: str | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)

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

    def columns(self) -> dict[str, Any]:
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
    # Of completion_tokens, those the model spent thinking (docs/protocol.md §14.3);
    # None where the protocol does not report them apart (Anthropic).
    reasoning_tokens: int | None = None


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
    service_tier: str | None = None  # the tier the server says it served (OpenAI)


def prompt_sha256(system: str | None, prompt: str) -> str:
    """The hash of what was asked: the system message and the user prompt as sent."""
    text = json.dumps([system, prompt], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def now_utc() -> datetime:
    return datetime.now(UTC)


class Status(StrEnum):
    OK = "ok"
    ERROR = "error"


def _col(arrow: pa.DataType, default: Any = None) -> Any:
    """A column of the output: its Arrow type rides on the field (the schema is derived)."""
    return field(default=default, metadata={"arrow": arrow})


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultRow:
    """Every manifest row (× prompt) ends as exactly one of these: the output schema.

    Built by ``ok_row``, ``error_row`` and ``copied_row`` from typed values (a
    ``Completion``, an error, the prepared image's columns); a misspelt column is a
    ``TypeError`` where it is written, not a silent null. ``extra`` holds the manifest's
    own columns. The sink conforms ``to_record()`` to the schema once more (the last
    gate for values from outside: docs/protocol.md §11.4).
    """

    id: str = _col(pa.string(), "")
    prompt_name: str = _col(pa.string(), DEFAULT_PROMPT_NAME)
    image: str = _col(pa.string(), "")
    caption: str | None = _col(pa.string())
    captions: tuple[str, ...] | None = _col(pa.list_(pa.string()))
    caption_json: str | None = _col(pa.string())
    json_valid: bool | None = _col(pa.bool_())
    status: Status = _col(pa.string(), Status.ERROR)
    error: str | None = _col(pa.string())
    error_class: str | None = _col(pa.string())
    finish_reason: str | None = _col(pa.string())
    finish_reason_raw: str | None = _col(pa.string())
    model: str | None = _col(pa.string())
    prompt_sha256: str | None = _col(pa.string())
    prompt_tokens: int | None = _col(pa.int64())
    completion_tokens: int | None = _col(pa.int64())
    total_tokens: int | None = _col(pa.int64())
    cached_tokens: int | None = _col(pa.int64())
    reasoning_tokens: int | None = _col(pa.int64())
    cost_usd: float | None = _col(pa.float64())
    usage_source: str | None = _col(pa.string())
    attempts: int = _col(pa.int32(), 0)
    latency_s: float | None = _col(pa.float64())
    ttft_s: float | None = _col(pa.float64())
    request_id: str | None = _col(pa.string())
    response_id: str | None = _col(pa.string())
    http_status: int | None = _col(pa.int32())
    retry_after_s: float | None = _col(pa.float64())
    terminal: str | None = _col(pa.string())
    quirks: str | None = _col(pa.string())
    line: int | None = _col(pa.int64())
    width: int | None = _col(pa.int32())
    height: int | None = _col(pa.int32())
    sent_width: int | None = _col(pa.int32())
    sent_height: int | None = _col(pa.int32())
    sent_bytes: int | None = _col(pa.int64())
    image_sha256: str | None = _col(pa.string())
    dedup_key: str | None = _col(pa.string())
    dedup_of: str | None = _col(pa.string())
    lane: str | None = _col(pa.string(), "online")     # "online" or "batch"
    batch_id: str | None = _col(pa.string())           # the provider's batch (batch lane)
    service_tier: str | None = _col(pa.string())       # the tier served (OpenAI flex, ...)
    # The quality gate (pipeline/quality): the checks the kept caption fails, why, and
    # the one re-ask (its count, what triggered it, its cost, included in cost_usd).
    quality_flags: tuple[str, ...] | None = _col(pa.list_(pa.string()))
    quality_notes: str | None = _col(pa.string())
    reasks: int = _col(pa.int32(), 0)
    reask_flags: tuple[str, ...] | None = _col(pa.list_(pa.string()))
    reask_cost_usd: float | None = _col(pa.float64())
    upstream: str | None = _col(pa.string())  # chained prompts: JSON name → caption hash
    finished_at: datetime = field(default_factory=now_utc, metadata={"arrow": _TIMESTAMP})
    extra: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    def to_record(self) -> dict[str, Any]:
        """The row as columns (the manifest's extras beside the fixed ones)."""
        out: dict[str, Any] = dict(self.extra)
        for name in BASE_ORDER:
            out[name] = getattr(self, name)
        for name in _LISTS:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value)
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ResultRow:
        """A row read back (from another process, or a part): columns by name."""
        known = {k: v for k, v in record.items() if k in BASE_NAMES}
        for name in _LISTS:
            if known.get(name) is not None:
                known[name] = tuple(known[name])
        extra = {k: v for k, v in record.items() if k not in BASE_NAMES}
        return cls(**known, extra=extra)


_LISTS = ("captions", "quality_flags", "reask_flags")
BASE_FIELDS: list[pa.Field] = [pa.field(f.name, f.metadata["arrow"])
                               for f in fields(ResultRow) if "arrow" in f.metadata]
BASE_ORDER = tuple(f.name for f in BASE_FIELDS)
BASE_NAMES = frozenset(BASE_ORDER)


def output_schema(extra_columns: list[str]) -> pa.Schema:
    extras = [pa.field(c, pa.string()) for c in extra_columns if c not in BASE_NAMES]
    return pa.schema(BASE_FIELDS + extras)


@dataclass(frozen=True, slots=True)
class Original:
    """What a copy of an identical image takes from the row that was captioned."""

    id: str
    caption: str | None
    finish_reason: str | None = None
    finish_reason_raw: str | None = None
    model: str | None = None
    response_id: str | None = None
    terminal: str | None = None
    quality_flags: tuple[str, ...] | None = None

    @classmethod
    def of(cls, row: ResultRow) -> Original:
        return cls(row.id, row.caption, row.finish_reason, row.finish_reason_raw, row.model,
                   row.response_id, row.terminal, row.quality_flags)


def _base(row: ManifestRow) -> dict[str, Any]:
    return {"id": row.id, "prompt_name": row.prompt_name, "image": row.image,
            "line": row.line, "extra": row.extra}


def ok_row(row: ManifestRow, c: Completion, **columns: Any) -> ResultRow:
    u = c.usage
    usage: dict[str, Any] = {} if u is None else {
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens, "cached_tokens": u.cached_tokens,
        "reasoning_tokens": u.reasoning_tokens}
    return ResultRow(
        **_base(row), status=Status.OK, caption=c.text,
        captions=tuple(c.texts) if c.texts else (c.text,), finish_reason=c.finish_reason,
        finish_reason_raw=c.finish_reason_raw, model=c.model, response_id=c.response_id,
        terminal=c.terminal, usage_source="reported" if u else "absent",
        service_tier=c.service_tier,
        quirks=json.dumps(c.quirks, sort_keys=True) if c.quirks else None,
        **usage, **columns)


def copied_row(row: ManifestRow, original: Original, **columns: Any) -> ResultRow:
    """A duplicate image: the caption of the row that was captioned, no tokens spent."""
    return ResultRow(
        **_base(row), status=Status.OK, caption=original.caption,
        captions=(original.caption,) if original.caption is not None else None,
        finish_reason=original.finish_reason, finish_reason_raw=original.finish_reason_raw,
        model=original.model, response_id=original.response_id, terminal=original.terminal,
        quality_flags=original.quality_flags, dedup_of=original.id, usage_source="dedup",
        cost_usd=0.0,  # no request, so no cost: 0, not unknown
        **columns)


def error_row(row: ManifestRow, message: str, error_class: str, **columns: Any) -> ResultRow:
    return ResultRow(**_base(row), status=Status.ERROR, error=message,
                     error_class=error_class, **columns)
