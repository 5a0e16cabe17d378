"""Opening OUT for a run and closing it after, the same for every engine.

``open_dataset`` runs before the first request: it folds the journal of a killed run
into a part, loads the checkpoint (which quarantines unreadable parts and repairs
duplicate keys), unifies the parts' schemas with this run's columns, and checks this
run's settings against ``_dataset.json``. ``close_dataset`` runs after a run that was
not stopped: it merges small parts and reduces replaced error rows to one row per key.
Neither ever fails a run whose rows are safe: a full disk during the merge is a
warning, not an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import output_error
from ..records import output_schema
from ..settings import Settings
from ..sources.manifest import Manifest
from ..sources.manifest_format import base_dir
from . import record as dataset_record
from .checkpoint import Checkpoint, ResumeState
from .outdir import quarantine, unify, union_schema
from .sink import compact, recover_journal

__all__ = ["Opened", "open_dataset", "close_dataset", "wanted_settings"]

log = logging.getLogger("pipeline")


@dataclass
class Opened:
    resume: ResumeState
    schema: pa.Schema            # every column the dataset has, this run's included
    record: dict[str, Any]       # _dataset.json as this run leaves it


def wanted_settings(s: Settings, manifest: Manifest) -> dict[str, dict[str, Any]]:
    """What decides a caption, per prompt name of this run (for ``_dataset.json``)."""
    image = {"max_edge": s.max_edge, "max_image_bytes": s.max_image_bytes,
             "fetch_urls": s.fetch_urls}
    return {p.name: dataset_record.prompt_settings(
                s.model, s.api, s.system, p.template, s.options.response_format, image)
            for p in s.named_prompts}


def _manifest_identity(s: Settings, manifest: Manifest) -> dict[str, Any]:
    path = "-" if manifest.one_shot and str(s.manifest) in ("-", "/dev/stdin") \
        else str(Path(s.manifest).resolve())
    return {"path": path, "base_dir": str(base_dir(s.manifest).resolve()),
            "columns": list(manifest.columns)}


def open_dataset(s: Settings, manifest: Manifest, run_id: str) -> Opened:
    """Everything OUT needs before the first request (blocking: call from a thread)."""
    out = s.out
    base = output_schema(manifest.extra_columns)
    try:
        recover_journal(out, base, run_id)
        resume = Checkpoint(out).load(s.retry_errors)
        schema = union_schema(base, resume.parts)
        problems = unify(resume.parts, schema)
    except OSError as e:
        raise output_error(e, out) from None
    if problems:
        for p in problems:
            quarantine(out, p.part, p.reason)
        resume = Checkpoint(out).load(s.retry_errors)
    if resume.duplicates_removed or resume.temp_files_removed:
        log.warning("repaired %s: removed %d duplicate rows and %d temporary files", out,
                    resume.duplicates_removed, resume.temp_files_removed)
    record = dataset_record.load(out)
    wanted = wanted_settings(s, manifest)
    dataset_record.check(record, out, wanted, resume.ok_by_prompt, s.allow_mixed)
    record = dataset_record.updated(record, wanted, _manifest_identity(s, manifest), run_id)
    try:
        dataset_record.write(out, record)
    except OSError as e:
        raise output_error(e, out / "_dataset.json") from None
    return Opened(resume, schema, record)


def close_dataset(s: Settings, parts: list[Path], run_id: str, schema: pa.Schema,
                  replaced_errors: bool) -> None:
    """Merge small parts; reduce replaced error rows. Never raises for a full disk."""
    try:
        compact(s.out, parts, run_id, schema)
        if replaced_errors:  # the new rows replace the error rows they retried
            Checkpoint(s.out).repair()
    except OSError as e:
        log.warning("%s; the parts were not merged, but every row is committed "
                    "(the next run merges them)", output_error(e, s.out).message)
