"""What every export format shares: the options, the writer interface, the counters,
the destination rules and the caption text rules.

A format is one ``Writer`` subclass: ``write(rows)`` is called with the exported rows
batch by batch (plain dicts, a few thousand at a time), ``finish()`` once at the end
(commit: rename temporary files into place), ``abort()`` when anything failed or was
interrupted (remove temporary files; what was already committed stays).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from .embedded import EMBEDDED_COLUMNS

if TYPE_CHECKING:
    from .images import Resolver
    from .reader import Committed, Selection

__all__ = ["ExportError", "Spec", "Summary", "Job", "Writer", "Stop", "Interrupted",
           "check_dest", "one_line", "caption_text", "with_trigger", "write_atomic",
           "jsonable", "json_columns", "DEFAULT_COLUMNS", "ERROR_COLUMNS"]

# Columns exported when --columns is not given (those OUT has and that hold a value),
# followed by the manifest's own columns.
DEFAULT_COLUMNS = ("id", "prompt_name", "image", "caption", "captions", "caption_json",
                   "model", "prompt_tokens", "completion_tokens", "total_tokens",
                   "cached_tokens", "width", "height", "image_sha256", "finished_at")
ERROR_COLUMNS = ("status", "error", "error_class")
MAX_SIDECAR_BYTES = 1 << 20  # an existing .txt larger than this is not a caption: left alone


class ExportError(Exception):
    """A reason the export cannot go on, as one line, and the exit code it means."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True)
class Spec:
    """The export's options, validated by ``command``."""

    out: Path
    dest: Path | None
    format: str
    include_errors: bool = False
    prompt_names: tuple[str, ...] = ()   # () = every prompt name OUT holds
    columns: tuple[str, ...] = ()        # () = DEFAULT_COLUMNS
    trigger: str | None = None
    force: bool = False
    images: str = "none"                 # none | copy | hardlink | symlink
    base_dir: Path | None = None
    progress: bool = True
    beside_images: bool = False          # sidecar only
    policy: str = "skip"                 # sidecar only
    extension: str = ".txt"              # sidecar only
    all_captions: bool = False
    shard_bytes: int = 500 * 1024 * 1024  # hf-parquet only


@dataclass
class Summary:
    """What the export did; ``line()`` is the one line printed at the end."""

    rows: int = 0          # exported rows read from OUT
    written: int = 0       # files or lines created
    updated: int = 0       # existing files changed (sidecar policies)
    unchanged: int = 0     # files already as they should be
    kept: int = 0          # existing files left alone (policy skip)
    images: int = 0        # image files copied or linked
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows
    examples: dict[str, str] = field(default_factory=dict)  # reason -> its first case

    def skip(self, reason: str, example: str | None = None) -> None:
        self.skipped[reason] += 1
        if example is not None:
            self.example(reason, example)

    def example(self, reason: str, text: str) -> None:
        self.examples.setdefault(reason, text)

    def line(self, fmt: str, where: str) -> str:
        bits = [f"{self.rows} rows", f"{self.written} written"]
        bits += [f"{n} {k}" for k, n in (("updated", self.updated),
                                         ("unchanged", self.unchanged),
                                         ("kept (policy skip)", self.kept),
                                         ("images placed", self.images)) if n]
        text = f"export {fmt}: {', '.join(bits)} -> {where}"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {k}" for k, n in
                                              self.skipped.most_common())
        return text


@dataclass
class Job:
    """Everything a writer gets: the options, OUT, the selection and the counters."""

    spec: Spec
    committed: Committed
    selection: Selection
    resolver: Resolver
    columns: list[str]       # the data columns to export, in order
    prompt_order: list[str]  # prompt names in output order
    summary: Summary = field(default_factory=Summary)
    stop: Stop = field(default_factory=lambda: Stop())

    def check_stop(self) -> None:
        """Raise ``Interrupted`` when a signal asked to stop (called between batches)."""
        if self.stop.exit_code is not None:
            raise Interrupted(self.stop.exit_code)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; raised at a batch boundary, never inside a library."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


@dataclass
class Stop:
    exit_code: int | None = None  # set by the signal handler: 130 (SIGINT), 143 (SIGTERM)


class Writer:
    """One export format. Subclasses set ``name`` and implement ``write``/``finish``."""

    name: ClassVar[str] = ""
    dest_is_file: ClassVar[bool] = False   # jsonl, csv: DEST names a file
    reserved: ClassVar[frozenset[str]] = frozenset()  # columns the format owns itself

    def __init__(self, job: Job) -> None:
        self.job = job
        self.spec = job.spec

    def read_columns(self) -> list[str]:
        """The columns to read from OUT (the exported ones plus what the format needs)."""
        have = set(self.job.committed.schema.names)
        return list(dict.fromkeys([*self.job.columns, "id", "prompt_name", "image",
                                   "caption", "captions",
                                   *(c for c in EMBEDDED_COLUMNS if c in have)]))

    def prepare(self) -> None:
        """Create what the format writes into (``__init__`` has no side effects, so an
        interruption at any point is cleaned up by ``abort``); may read OUT once more."""

    def write(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Remove temporary files; whatever ``finish`` committed earlier stays."""


def check_dest(dest: Path, out: Path, force: bool, is_file: bool) -> None:
    """Refuse a destination inside OUT, or a non-empty one without --force."""
    try:
        inside = dest.resolve().is_relative_to(out.resolve())
    except OSError:
        inside = False
    if inside:
        raise ExportError(f"--to {dest} is inside OUT {out}: export somewhere else "
                          "(OUT holds the dataset itself)")
    if is_file:
        if dest.is_dir():
            raise ExportError(f"--to {dest} is a directory; this format writes one file")
        if dest.exists() and dest.stat().st_size and not force:
            raise ExportError(f"--to {dest} exists and is not empty: pass --force to "
                              "replace it")
        return
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"--to {dest} is a file; this format writes a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ExportError(f"--to {dest} is not empty: pass --force to write into it "
                          "(files of an earlier export of this format are replaced)")


_SPACE = re.compile(r"\s+")


def one_line(text: str) -> str:
    """A caption as one line: any run of whitespace (newlines included) is one space."""
    return _SPACE.sub(" ", text).strip()


def caption_text(text: str | None, trigger: str | None) -> str | None:
    """``text`` with the trigger word first (``"WORD, caption"``), unless it already is."""
    if text is None or not trigger:
        return text
    if text == trigger or text.startswith(trigger + ","):
        return text
    return f"{trigger}, {text}"


def with_trigger(rec: dict[str, Any], trigger: str | None) -> dict[str, Any]:
    """``rec`` with the trigger word put first in its ``caption`` and ``captions``."""
    if trigger:
        if isinstance(rec.get("caption"), str):
            rec["caption"] = caption_text(rec["caption"], trigger)
        if isinstance(rec.get("captions"), list):
            rec["captions"] = [caption_text(c, trigger) for c in rec["captions"]]
    return rec


def jsonable(v: Any) -> Any:
    """A column value for JSON: timestamps as ISO 8601, NaN and infinities as null."""
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def json_columns(schema: pa.Schema, columns: list[str]) -> list[tuple[str, bool]]:
    """(column, needs ``jsonable``): only timestamp and float columns do (speed)."""
    def needs(t: pa.DataType) -> bool:
        return bool(pa.types.is_timestamp(t) or pa.types.is_date(t)
                    or pa.types.is_floating(t))
    return [(c, needs(schema.field(c).type)) for c in columns]


def tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(final: Path, data: bytes, sync: bool = False) -> None:
    """Write ``final`` as a whole or not at all (temp file, then rename).

    ``sync`` adds an fsync first: for the one big file of a format, not for each of a
    million sidecars (a rename is atomic against a kill; only a power cut could leave
    an empty new file, which a re-export with --policy overwrite rewrites).
    """
    tmp = tmp_path(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_atomic(src: str | Path, final: Path) -> None:
    tmp = tmp_path(final)
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
