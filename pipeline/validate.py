"""Values from outside, made safe to keep: text that is valid UTF-8, numbers that are numbers.

Everything that reaches a result row from the wire, the manifest or a header passes
through here once. Two layers (docs/protocol.md §11):

* ``clean_text`` / ``as_text`` / ``as_count`` at the wire boundary, used by the adapters
  and the transport: a surrogate pair that arrived as two JSON escapes split across
  chunks (``\\ud83d`` then ``\\ude80``) is joined, a lone surrogate or an undecodable
  byte (aiohttp decodes header bytes with ``surrogateescape``) becomes U+FFFD and is
  counted, a number where text belongs becomes its text.
* ``conform_row`` at the sink: the last gate before Arrow. Whatever a bug upstream let
  through, each value is coerced to its column's type or dropped to null, so no value
  from outside can make a Parquet write fail.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

__all__ = ["clean_text", "as_text", "as_count", "conform_row", "RowConformer", "MAX_COUNT"]

log = logging.getLogger("pipeline")

# Token counts beyond this are not counts (2**53: exact in a float, far below int64).
MAX_COUNT = 2**53
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_warned: set[str] = set()


def clean_text(s: str) -> tuple[str, int]:
    """``s`` as valid UTF-8 text, and how many code points had to be replaced."""
    try:
        s.encode("utf-8")
        return s, 0
    except UnicodeEncodeError:
        pass
    # UTF-16 round trip: pairs of surrogates become the character they encode; lone
    # surrogates (also surrogateescape'd bytes, U+DC80..U+DCFF) become U+FFFD.
    fixed = s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return fixed, fixed.count("\ufffd") - s.count("\ufffd")


def as_text(v: Any, limit: int | None = None) -> str | None:
    """Text from a value of a field that should be a string; None when it cannot be.

    A number (not a bool) is taken as its text, as a gateway sending ``"model": 123``
    clearly means the model "123"; objects, lists and booleans have no text meaning.
    """
    if isinstance(v, str):
        text = clean_text(v)[0]
    elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        text = str(v)
    else:
        return None
    return text[:limit] if limit is not None else text


def as_count(v: Any) -> int | None:
    """A token count: a non-negative integer below ``MAX_COUNT``, else None."""
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            return None
    return v if 0 <= v < MAX_COUNT else None


def _string(v: Any, scrub: Callable[[str], str] | None) -> str:
    if isinstance(v, str):
        text = clean_text(v)[0]
    elif isinstance(v, Mapping | list | tuple):
        text = json.dumps(v, ensure_ascii=False, default=str)
        text = clean_text(text)[0]
    else:
        text = clean_text(str(v))[0]
    return scrub(text) if scrub is not None else text


def _integer(v: Any, bounds: tuple[int, int]) -> int | None:
    if isinstance(v, bool):
        v = int(v)
    elif isinstance(v, float):
        if not v.is_integer():
            return None
        v = int(v)
    elif isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            return None
    elif not isinstance(v, int):
        return None
    return v if bounds[0] <= v <= bounds[1] else None


def _floating(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _timestamp(v: Any) -> datetime | None:
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v)
        except ValueError:
            return None
    if not isinstance(v, datetime):
        return None
    return v if v.tzinfo is not None else v.replace(tzinfo=UTC)


def _converter(t: pa.DataType, scrub: Callable[[str], str] | None) -> Callable[[Any], Any]:
    """The coercion for one column type (chosen once per schema, not per value)."""
    if pa.types.is_string(t):
        return lambda v: _string(v, scrub)
    if pa.types.is_int32(t):
        return lambda v: _integer(v, _INT32)
    if pa.types.is_integer(t):
        return lambda v: _integer(v, _INT64)
    if pa.types.is_floating(t):
        return _floating
    if pa.types.is_boolean(t):
        return lambda v: v if isinstance(v, bool) else None
    if pa.types.is_timestamp(t):
        return _timestamp
    if pa.types.is_list(t):
        return lambda v: ([None if x is None else _string(x, scrub) for x in v]
                          if isinstance(v, list | tuple) else None)
    return lambda v: None  # a type this module does not know: null, not a failed write


class RowConformer:
    """Coerces rows to ``schema``: every value of its column's type (or null), only
    schema columns. ``scrub`` (the redactor) runs over every string except the
    ``keep_as_given`` columns, which hold the user's own values (the manifest's
    ``image``)."""

    def __init__(self, schema: pa.Schema, scrub: Callable[[str], str] | None = None,
                 keep_as_given: frozenset[str] = frozenset({"image"})) -> None:
        self.schema = schema
        self._fields = [(f.name, _converter(f.type, None if f.name in keep_as_given
                                             else scrub)) for f in schema]
        self._names = frozenset(f.name for f in schema)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        out = {name: None if (v := row.get(name)) is None else convert(v)
               for name, convert in self._fields}
        if len(row) > len(out) or not row.keys() <= self._names:
            for name in row.keys() - self._names:
                if name not in _warned:  # a programming error: say it once, never fail
                    _warned.add(name)
                    log.error("internal: result field %r is not an output column; dropped",
                              name)
        return out


def conform_row(row: Mapping[str, Any], schema: pa.Schema,
                scrub: Callable[[str], str] | None = None) -> dict[str, Any]:
    """One row through a ``RowConformer`` (for callers with a single row)."""
    return RowConformer(schema, scrub)(row)
