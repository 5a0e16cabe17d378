"""What the process writes for people and for log collectors: one place for both formats.

Text (the default) is for people: ``WARNING ...`` log lines, ``error: ...`` and the
``summary: ...`` line. With ``--log-format json`` every line on stdout and stderr is one
JSON object with a UTC timestamp (``ts``), a ``level`` and an ``event`` name, so a log
collector never meets a line it cannot parse.

Log records reach stderr through ``tqdm.write``: while a progress bar is drawn, a
message clears the bar, prints on a line of its own and the bar is redrawn below it.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from PIL import Image
from tqdm import tqdm

from .redact import RedactingFilter

__all__ = ["JsonFormatter", "Say", "json_line", "setup_logging", "wants_json"]

TEXT_FORMAT = "%(levelname)s %(message)s"


def _ts(when: datetime | None = None) -> str:
    when = when or datetime.now(UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_line(event: str, level: str = "info", *, ts: datetime | None = None,
              **fields: Any) -> str:
    """One JSON object: ``ts``, ``level`` and ``event`` first, then ``fields``.

    ASCII-only output (non-ASCII and lone surrogates escaped), so any collector and
    any terminal encoding reads it.
    """
    return json.dumps({"ts": _ts(ts), "level": level, "event": event, **fields},
                      default=str)


def wants_json(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for JSON lines, read before (or without) a full parse, so
    even a usage error is reported in the format the caller's collector expects."""
    args = list(argv)
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--log-format=json" or (a == "--log-format" and args[i + 1:i + 2] == ["json"]):
            return True
    return False


class JsonFormatter(logging.Formatter):
    """A log record as a JSON line; ``extra={"event": ...}`` names the event."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        level = "warning" if record.levelno == logging.WARNING else record.levelname.lower()
        return json_line(getattr(record, "event", None) or "log", level,
                         ts=datetime.fromtimestamp(record.created, UTC), **fields)


class _BarAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes through ``tqdm.write``: a message never lands on the progress bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


_REDACT = RedactingFilter()


def setup_logging(verbose: int | bool, json_lines: bool, stream: TextIO | None = None) -> None:
    """Configure the root logger for one CLI command (the one place that does).

    ``-v``: this tool's debug lines (one per retry and per failed row); ``-vv``: every
    library's too. Third-party loggers stay at warning below ``-vv``: Pillow alone
    writes a debug line per image chunk it parses. Every handler redacts what it is
    given. Replaces only a handler it installed earlier (a test may call the CLI many
    times; pytest's own capture handlers stay). ``warnings.warn`` goes through logging
    too, so a library warning is a JSON line like any other.
    """
    level = int(verbose)
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _BarAwareHandler)]:
        root.removeHandler(h)
    handler = _BarAwareHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level >= 2 else logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.DEBUG if level else logging.NOTSET)
    for each in root.handlers:
        each.addFilter(_REDACT)  # the same instance: a second call adds nothing
    logging.captureWarnings(True)
    # Pillow warns of images above its pixel limit; the image stage refuses those with
    # a row error of its own, so the warning (process-wide, per image) is noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class Say:
    """The CLI's own lines (``error: ...``, ``stopped: ...``) in the chosen format."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines

    def line(self, label: str, message: str, *, level: str = "error", **fields: Any) -> str:
        if self.json_lines:
            return json_line(label, level, message=message, **fields)
        return f"{label}: {message}"

    def __call__(self, label: str, message: str, *, level: str = "error",
                 stream: TextIO | None = None, **fields: Any) -> None:
        print(self.line(label, message, level=level, **fields), file=stream or sys.stderr,
              flush=True)
