"""One redactor for every string that leaves the process.

Whatever is written to stderr, logs, Parquet columns, run reports, the report page or
``status`` passes through ``redact``, which removes

* every registered secret (the API key, whichever variable or header carried it;
  ``add_secret`` also covers its URL-encoded form, which a gateway may quote),
* the value of an ``Authorization``/``Proxy-Authorization``/``x-api-key``/``api-key``
  (and Google's ``x-goog-api-key``) header quoted in text, in ``Name: value``,
  ``"name": "value"`` or ``name=value`` form, keeping the auth scheme word,
* the password of URL user-info (``https://user:***@host``) and credential-like query
  parameters (``?key=…``, ``?api_key=…``, ``?token=…``, S3/GCS signatures).

Secrets are registered process-wide: the CLI registers the key before anything runs,
and every ``Transport`` registers the credentials it sends, so a Ray actor process is
covered too. A value shorter than ``MIN_SECRET`` characters is not registered: blanking
every "abc" in every message would make errors unreadable and protect nothing.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO
from urllib.parse import quote

__all__ = ["MASK", "MIN_SECRET", "RedactingFilter", "RedactingStream", "add_secret",
           "redact", "redact_obj", "redacted_std_streams"]

MASK = "***"
MIN_SECRET = 8

_lock = threading.Lock()
_secrets: set[str] = set()
_secret_re: re.Pattern[str] | None = None

_HEADER_NAMES = r"(?:proxy-)?authorization|x-api-key|x-goog-api-key|api-key"
# name, separator (": ", '": "', "="), an optional scheme word, then the value.
_HEADER = re.compile(
    rf"""(?ix)
    (?<![\w-])({_HEADER_NAMES})
    (["']?\s*[:=]\s*["']?)
    ((?:bearer|basic|token|digest)\s+)?
    ([^\s"',;}}\]]+)
    """)
_HEADER_HINT = re.compile(_HEADER_NAMES, re.I)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@?#]*):([^/\s@?#]*)@")
_QUERY = re.compile(
    r"(?i)([?&](?:api[-_]?key|key|access[-_]token|token|auth|password|sig|signature"
    r"|x-amz-signature|x-amz-security-token|x-amz-credential|x-goog-signature"
    r"|x-goog-credential)=)([^&#\s\"']+)")


def add_secret(value: str | None) -> None:
    """Register ``value`` (and its URL-encoded form) so ``redact`` removes it."""
    global _secret_re
    if not value or len(value) < MIN_SECRET:
        return
    with _lock:
        new = {value, quote(value, safe="")} - _secrets
        if not new:
            return
        _secrets.update(new)
        # Longest first, so a secret that contains another is removed whole.
        alternatives = sorted(_secrets, key=len, reverse=True)
        _secret_re = re.compile("|".join(re.escape(s) for s in alternatives))


def redact(text: str) -> str:
    """``text`` without registered secrets, credential headers or URL passwords."""
    if not text:
        return text
    pattern = _secret_re
    if pattern is not None:
        text = pattern.sub(MASK, text)
    # Each pattern only where it can match (a header name, an "@", an "="): every string
    # of every row written to OUT passes here, and most hold none of them.
    if _HEADER_HINT.search(text):
        text = _HEADER.sub(_header_value, text)
    if "@" in text:
        text = _USERINFO.sub(rf"\1:{MASK}@", text)
    if "=" in text:
        text = _QUERY.sub(rf"\1{MASK}", text)
    return text


def _header_value(m: re.Match[str]) -> str:
    return f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{MASK}"


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like structure with every string (keys too) redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """Redacts a record's message, arguments and traceback before any handler formats it.

    Installed on handlers (not loggers), so records of every logger are covered.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it (to a redacted stderr)
            return True
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class RedactingStream:
    """A text stream wrapper whose ``write`` redacts; everything else is delegated."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)  # what the caller handed over, as TextIO promises

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def redacted_std_streams() -> Iterator[None]:
    """While active, whatever any module prints to stdout or stderr is redacted."""
    import sys

    saved = sys.stdout, sys.stderr
    sys.stdout = RedactingStream(saved[0])
    sys.stderr = RedactingStream(saved[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
