"""``OUT/_dataset.json``: what made the dataset, so a resume cannot silently mix settings.

Per prompt name it records what decides a caption: the model, the protocol, the system
message, the prompt template, the response format and the image settings; and it
records the manifest the dataset was last made from (its path, the folder relative
image paths resolve against, its columns), which ``report`` uses to find the images.

Before a run starts, ``check`` compares this run's settings with the record for every
prompt name OUT already holds ``ok`` captions of: a difference stops the run (exit 2,
one line naming what differs and the ways on) unless ``--allow-mixed`` is given, in
which case the old settings move to ``history`` and each row's ``model`` and
``prompt_sha256`` tell the rows apart. The file is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import RunFatal
from ..records import now_utc
from .outdir import RECORD, fsync_file, tmp_name

__all__ = ["load", "check", "updated", "write", "prompt_settings"]

log = logging.getLogger("pipeline")

VERSION = 1
# tool_schema shapes the caption as response_format does (a record written before it
# existed has none, which equals a run without --tool-schema).
_FIELDS = ("model", "api", "system", "template", "response_format", "tool_schema", "image")


def prompt_settings(model: str, api: str, system: str | None, template: str,
                    response_format: Mapping[str, Any] | None,
                    image: Mapping[str, Any],
                    tool_schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"model": model, "api": api, "system": system, "template": template,
            "response_format": dict(response_format) if response_format else None,
            "tool_schema": dict(tool_schema) if tool_schema else None,
            "image": dict(image)}


def load(out: Path) -> dict[str, Any] | None:
    """The record, or None when OUT has none yet (a damaged one is set aside)."""
    path = out / RECORD
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        doc = None
        log.warning("%s cannot be read (%s); a new one is written", path, e)
    if not isinstance(doc, dict) or not isinstance(doc.get("prompts"), dict):
        if doc is not None:
            log.warning("%s is not a dataset record; a new one is written", path)
        return None
    return doc


def _show(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False, sort_keys=True) if not isinstance(v, str) \
        else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for f in _FIELDS:
        if old.get(f) != new.get(f):
            label = "prompt" if f == "template" else f.replace("_", " ")
            out.append(f"{label} {_show(old.get(f))} (this run: {_show(new.get(f))})")
    return out


def check(record: Mapping[str, Any] | None, out: Path, wanted: Mapping[str, dict[str, Any]],
          ok_by_prompt: Mapping[str, int], allow_mixed: bool) -> None:
    """Raise RunFatal (exit 2) when this run would add rows made differently."""
    if record is None or allow_mixed:
        return
    for name, new in wanted.items():
        old = record["prompts"].get(name)
        if not isinstance(old, dict) or not ok_by_prompt.get(name):
            continue
        diffs = _differences(old, new)
        if diffs:
            raise RunFatal(
                f"{out} holds {ok_by_prompt[name]} captions of prompt {name!r} made with "
                f"{'; '.join(diffs)}. Caption into a new --out, give this prompt a new name "
                f"(--named-prompt NAME=...), or pass --allow-mixed to add rows made "
                "differently", "config", exit_code=2)


def updated(record: Mapping[str, Any] | None, wanted: Mapping[str, dict[str, Any]],
            manifest: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """The record after this run's start: new prompt names added, changed ones (only
    possible with --allow-mixed) replaced with their old settings kept in history."""
    now = now_utc().isoformat()
    doc: dict[str, Any] = dict(record) if record else {"version": VERSION, "created": now,
                                                        "prompts": {}, "history": []}
    prompts = dict(doc.get("prompts") or {})
    history = list(doc.get("history") or [])
    for name, new in wanted.items():
        old = prompts.get(name)
        if isinstance(old, dict) and _differences(old, new):
            history.append({"prompt_name": name, **old, "until_run": run_id})
        if not isinstance(old, dict) or _differences(old, new):
            prompts[name] = {**new, "since_run": run_id}
    doc.update(version=VERSION, updated=now, prompts=prompts, history=history,
               manifest=dict(manifest))
    return doc


def write(out: Path, doc: Mapping[str, Any]) -> None:
    final = out / RECORD
    tmp = tmp_name(final)
    try:
        tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str),
                       encoding="utf-8")
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
