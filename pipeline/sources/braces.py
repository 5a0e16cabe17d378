"""Brace patterns for shard lists, as WebDataset and img2dataset write them.

``shards/{00000..00099}.tar`` is a numeric range (zero padding kept: the wider of the
two ends sets the width when either is padded), ``{train,val}/x.tar`` a list; several
braces multiply. The expansion is bounded (``MAX_NAMES``) and lazy-free: a pattern that
would give more names is an error, not a memory blow-up.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = ["BraceError", "MAX_NAMES", "expand", "has_braces"]

MAX_NAMES = 1_000_000
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class BraceError(ValueError):
    pass


def has_braces(pattern: str) -> bool:
    m = _BRACE.search(pattern)
    return bool(m and (".." in m.group(1) or "," in m.group(1)))


def _choices(body: str) -> list[str]:
    m = _RANGE.match(body)
    if m:
        a, b = m.group(1), m.group(2)
        lo, hi = int(a), int(b)
        padded = (len(a) > 1 and a.lstrip("-").startswith("0")) or \
                 (len(b) > 1 and b.lstrip("-").startswith("0"))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if hi >= lo else -1
        if abs(hi - lo) + 1 > MAX_NAMES:
            raise BraceError(f"{{{body}}} names more than {MAX_NAMES} shards")
        return [str(i).zfill(width) for i in range(lo, hi + step, step)]
    if "," in body:
        return body.split(",")
    return ["{" + body + "}"]  # not a pattern: literal braces


def expand(pattern: str) -> list[str]:
    """Every name ``pattern`` stands for, in order."""
    names = list(_expand(pattern))
    return names


def _expand(pattern: str) -> Iterator[str]:
    m = _BRACE.search(pattern)
    if not m or not (".." in m.group(1) or "," in m.group(1)):
        yield pattern
        return
    head, tail = pattern[:m.start()], pattern[m.end():]
    tails = list(_expand(tail))
    choices = _choices(m.group(1))
    if len(choices) * len(tails) > MAX_NAMES:
        raise BraceError(f"{pattern!r} names more than {MAX_NAMES} shards")
    for c in choices:
        for t in tails:
            yield head + c + t
