"""A success body, bytes in, one ``Completion`` out: an event stream folded by the
protocol's state, or a JSON completion, within the line and response caps.

The worker hands over the chunks of a 2xx answer; nothing here sends, retries or
paces. Shapes no adapter foresaw become ``bad_response`` (permanent, docs/protocol.md
§11), a broken or oversized stream ``stream_broken`` (retried).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from ..errors import Retryable, bad_response
from ..records import Completion
from .adapters.base import Adapter, StreamState
from .options import RequestOptions
from .sse import SSEDecoder, StreamTooLong

__all__ = ["ResponseReader", "first_mismatch", "no_json_constant", "structured_columns"]

# Valid JSON of a shape no protocol allows ("choices": [null], a number where an
# object belongs) surfaces as one of these from an adapter's fold.
_SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError)


def no_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python accepts NaN/Infinity; JSON does not


def structured_columns(text: str, options: RequestOptions) -> dict[str, Any]:
    """With ``--response-format`` or ``--tool-schema`` the caption must be JSON (a tool
    call's arguments: an object, docs/protocol.md §16); else the attempt is retried as
    ``invalid_json``. Returns the ``caption_json`` / ``json_valid`` columns."""
    if options.response_format is None and options.tool_schema is None:
        return {}
    try:
        doc = json.loads(text, parse_constant=no_json_constant)
    except (ValueError, RecursionError) as e:  # a server's endless nesting too
        raise Retryable(f"the caption is not valid JSON ({type(e).__name__}: "
                        f"{str(e)[:120]}): {text[:80]!r}", "invalid_json",
                        http_status=200) from None
    if options.tool_schema is not None and not isinstance(doc, dict):
        raise Retryable(f"the tool call's arguments are {type(doc).__name__}, not an "
                        "object", "invalid_json", http_status=200)
    schema, what = _schema_of(options)
    if schema is not None:
        mismatch = first_mismatch(json.dumps(schema, sort_keys=True), doc)
        if mismatch:
            raise Retryable(f"the {what} does not match its schema ({mismatch})",
                            "invalid_json", http_status=200)
    return {"caption_json": json.dumps(doc, ensure_ascii=False), "json_valid": True}


def _schema_of(options: RequestOptions) -> tuple[dict[str, Any] | None, str]:
    if options.tool_schema is not None:
        return options.tool_schema, "tool call's arguments"
    rf = options.response_format or {}
    inner = rf.get("json_schema") if isinstance(rf, dict) else None
    schema = inner.get("schema") if isinstance(inner, dict) else None
    return (schema, "caption") if isinstance(schema, dict) else (None, "")


@functools.lru_cache(maxsize=8)
def _validator(schema_text: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema_text))


def first_mismatch(schema_text: str, doc: Any) -> str | None:
    """The first way ``doc`` breaks the schema, said briefly (path: message), or None."""
    try:
        validator = _validator(schema_text)
    except Exception:  # a schema the library cannot use: parsing alone decides
        return None
    try:
        error = next(iter(validator.iter_errors(doc)), None)
    except RecursionError:
        return "nested too deeply to check"
    if error is None:
        return None
    where = "/".join(map(str, error.absolute_path)) or "top level"
    return f"{where}: {error.message[:200]}"


class ResponseReader:
    def __init__(self, adapter: Adapter, choices: int, line_cap: int, response_cap: int,
                 clock: Callable[[], float]) -> None:
        self.adapter, self.choices, self.clock = adapter, choices, clock
        self.line_cap, self.response_cap = line_cap, response_cap

    async def stream(self, chunks: AsyncIterator[bytes]) -> tuple[Completion, float | None]:
        """Fold an event stream; also the time of its first content. A body whose first
        byte opens a JSON document is one: a gateway that labels a whole completion
        ``text/event-stream`` (it is read as the completion it is)."""
        state = self.adapter.new_state(self.choices)
        decoder = SSEDecoder(self.line_cap)
        cap = self.response_cap
        size, sniffing = 0, True
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > cap:
                    raise _too_large(cap, "the streamed response")
                if sniffing and chunk.strip():
                    sniffing = False
                    if chunk.lstrip()[:1] in (b"{", b"["):
                        body = await _collect(chunks, cap, chunk)
                        return self._json_in_stream(body, state, decoder), None
                if self._feed(state, decoder, chunk):
                    return _utf8_quirk(state.finish(), decoder), state.first_content_at
            self._end(state, decoder)
            return _utf8_quirk(state.finish(), decoder), state.first_content_at
        except StreamTooLong as e:
            raise Retryable(f"broken stream: {e}", "stream_broken", http_status=200) from None
        except _SHAPE_ERRORS as e:
            # A shape the adapter did not foresee: this answer is unusable, the batch
            # is not (the adapters name the shapes they know as bad_response).
            raise bad_response(f"unexpected stream content ({type(e).__name__}: {e})") from e

    async def json_body(self, chunks: AsyncIterator[bytes]) -> Completion:
        """A 200 with a JSON body instead of a stream: a full completion or an error,
        read up to the response cap (not the small cap on error bodies)."""
        body = await _collect(chunks, self.response_cap)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise Retryable("HTTP 200 with an unreadable JSON body", "stream_broken",
                            http_status=200) from None
        return self._from_json(doc)

    def _feed(self, state: StreamState, decoder: SSEDecoder, data: bytes) -> bool:
        """Decode ``data`` into ``state``; True once the stream's terminator arrived."""
        clock = self.clock
        return any(state.on_event(event, clock()) for event in decoder.feed(data))

    def _end(self, state: StreamState, decoder: SSEDecoder) -> None:
        for event in decoder.finish():
            if state.on_event(event, self.clock()):
                break

    def _json_in_stream(self, body: bytes, state: StreamState, decoder: SSEDecoder
                        ) -> Completion:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):  # JSON first, then something else: the fold
            if not self._feed(state, decoder, body):
                self._end(state, decoder)
            return state.finish()
        completion = self._from_json(doc)
        return replace(completion, quirks={**completion.quirks, "json_body_as_event_stream": 1})

    def _from_json(self, doc: Any) -> Completion:
        try:
            return self.adapter.from_json(_unwrap(doc))
        except _SHAPE_ERRORS as e:
            # Valid JSON of a shape no adapter foresaw: this answer is unusable (permanent,
            # docs/protocol.md §11), the batch is not.
            raise bad_response(f"unexpected JSON completion ({type(e).__name__}: {e})"
                               ) from e


def _utf8_quirk(c: Completion, decoder: SSEDecoder) -> Completion:
    if not decoder.invalid_utf8:
        return c
    return replace(c, quirks={**c.quirks, "invalid_utf8": decoder.invalid_utf8})


async def _collect(chunks: AsyncIterator[bytes], cap: int, prefix: bytes = b"") -> bytes:
    """The rest of a success body after ``prefix``; more than ``cap`` bytes fails."""
    parts, size = [prefix], len(prefix)
    async for chunk in chunks:
        size += len(chunk)
        if size > cap:
            raise _too_large(cap, "the JSON response")
        parts.append(chunk)
    return b"".join(parts)


def _too_large(cap: int, what: str) -> Retryable:
    return Retryable(f"{what} is larger than {cap} bytes (--max-response-bytes); the "
                     "server may be ignoring max_tokens", "stream_broken", http_status=200)


def _unwrap(doc: Any) -> Any:
    """Gemini-style errors come as a one-item list around the object."""
    if isinstance(doc, list) and len(doc) == 1 and isinstance(doc[0], dict):
        return doc[0]
    return doc
