"""``--format sidecar``: one caption file per image, for LoRA and fine-tuning trainers.

kohya sd-scripts, diffusers' examples, OneTrainer and musubi-tuner read ``NAME.txt``
beside ``NAME.png``. The file is written beside the image only with
``--beside-images``; otherwise under ``--to DEST`` at the image's path relative to the
manifest's folder (with ``--images copy|hardlink|symlink`` the image goes there too).

One line per caption: the caption of each exported prompt name, in ``--prompt-name``
order (default: the order ``_dataset.json`` lists them), or every choice of an
``--n`` run with ``--all-captions``; whitespace runs (newlines included) become one
space, ``--trigger WORD`` puts ``WORD, `` first, a line already present is not
repeated. When the file exists, ``--policy`` decides:

    skip       leave it as it is (the default)
    overwrite  replace it with this export's lines
    append     add this export's lines that it does not hold yet, after its text
    prepend    the same, before its text

so a second export with the same options changes nothing. Image files are never
written, and a file is replaced by rename, never written in place.

Several rows for one file (named prompts, or two ids of one image) must meet before
the file is written; they may sit in different parts, far apart. They are staged in a
temporary SQLite table and read back sorted by file (SQLite sorts on disk within a
fixed cache), so memory stays flat. When each file gets one row (one prompt name, no
repeated image: checked in a first pass over the ``image`` column) rows are written as
they come.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .base import MAX_SIDECAR_BYTES, Job, Writer, caption_text, one_line, write_atomic
from .images import ImageRef, place

__all__ = ["SidecarWriter"]

_STAGE_ROWS = 10_000  # staged lines sent to SQLite at once
_NOT_TEXT = f"existing sidecars that are not caption text (over {MAX_SIDECAR_BYTES >> 20} MiB " \
            "or not UTF-8)"
_CLASH = "rows whose images share one sidecar name"


class SidecarWriter(Writer):
    name = "sidecar"

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.rank = {n: i for i, n in enumerate(job.prompt_order)}
        self.stage: _Stage | None = None
        self._made_dir: str | None = None
        self.dest = str(self.spec.dest) if self.spec.dest is not None else None

    def read_columns(self) -> list[str]:
        return ["id", "prompt_name", "image", "caption", "captions"]

    def prepare(self) -> None:
        if len(self.job.selection.prompt_names) > 1 or self._targets_repeat():
            self.stage = _Stage()

    def _targets_repeat(self) -> bool:
        """Does any sidecar file get more than one row? (one pass over ``image``)"""
        hashes: list[np.ndarray] = []
        j = self.job
        for b in j.committed.batches(["image"], j.selection, self.spec.include_errors,
                                     self.spec.prompt_names or None):
            targets = [self._target(j.resolver.resolve(v)) for v in b["image"].to_pylist()]
            keys = [t for t in targets if t is not None]
            hashes.append(np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys)))
        s = np.sort(np.concatenate(hashes)) if hashes else np.empty(0, np.int64)
        return bool((s[1:] == s[:-1]).any())

    def _target(self, ref: ImageRef) -> str | None:
        """The sidecar's path: the image's, with the extension replaced."""
        if ref.skip_reason is not None:
            return None
        if self.spec.beside_images:
            assert ref.path is not None
            return os.path.splitext(ref.path)[0] + self.spec.extension
        assert ref.rel is not None and self.dest is not None
        return os.path.join(self.dest, os.path.splitext(ref.rel)[0] + self.spec.extension)

    def _lines(self, r: dict[str, Any]) -> list[str]:
        texts = (r.get("captions") or []) if self.spec.all_captions else []
        texts = texts or [r.get("caption")]
        lines = (caption_text(one_line(t), self.spec.trigger) for t in texts if t)
        return list(dict.fromkeys(t for t in lines if t))

    def write(self, rows: list[dict[str, Any]]) -> None:
        s = self.job.summary
        for r in rows:
            ref = self.job.resolver.resolve(r.get("image"))
            target = self._target(ref)
            if target is None:
                s.skipped[ref.skip_reason or "rows without an image"] += 1
                continue
            lines = self._lines(r)
            if not lines:
                s.skipped["rows without a caption"] += 1
                continue
            assert ref.path is not None
            if target == ref.path:
                s.skipped[f"images whose name ends in {self.spec.extension}"] += 1
                continue
            needs_file = self.spec.beside_images or self.spec.images != "none"
            if needs_file and not os.path.isfile(ref.path):
                s.skip("missing or unreadable image files", ref.path)
                continue
            if self.spec.images != "none" and not self.spec.beside_images:
                assert ref.rel is not None and self.spec.dest is not None
                self._mkdir(os.path.dirname(target))
                s.images += place(ref.path, self.spec.dest / ref.rel, self.spec.images)
            if self.stage is not None:
                self.stage.add(target, ref.path,
                               self.rank.get(r.get("prompt_name") or "", len(self.rank)),
                               str(r.get("id")), lines)
            else:
                self._apply(target, lines)

    def finish(self) -> None:
        if self.stage is None:
            return
        try:
            for n, (target, images, lines) in enumerate(self.stage.groups()):
                if n % 1024 == 0:
                    self.job.check_stop()
                if len(images) > 1:
                    self.job.summary.skipped[_CLASH] += len(lines)
                    self.job.summary.example(_CLASH, f"{' and '.join(sorted(images)[:2])} "
                                                     f"-> {target}")
                    continue
                self._apply(target, list(dict.fromkeys(lines)))
        finally:
            self.stage.close()
            self.stage = None

    def abort(self) -> None:
        if self.stage is not None:
            self.stage.close()
            self.stage = None

    def _mkdir(self, folder: str) -> None:
        if folder != self._made_dir:  # rows come in folder order mostly: one mkdir each
            os.makedirs(folder, exist_ok=True)
            self._made_dir = folder

    def _apply(self, target: str, lines: list[str]) -> None:
        s = self.job.summary
        existing = _read_existing(target)
        if existing is False and self.spec.policy != "overwrite":
            s.skipped[_NOT_TEXT] += 1
            s.example(_NOT_TEXT, target)
            return
        if existing is None:
            if not self.spec.beside_images:
                self._mkdir(os.path.dirname(target))
            write_atomic(Path(target), _text(lines).encode("utf-8"))
            s.written += 1
            return
        if self.spec.policy == "skip":
            s.kept += 1
            return
        new = compose(existing if isinstance(existing, str) else "", lines, self.spec.policy)
        if new == existing:
            s.unchanged += 1
            return
        write_atomic(Path(target), new.encode("utf-8"))
        s.updated += 1


def compose(existing: str, lines: list[str], policy: str) -> str:
    """The file's text after ``policy`` puts ``lines`` into ``existing``."""
    if policy == "overwrite":
        return _text(lines)
    present = {ln.strip() for ln in existing.splitlines()}
    new = [ln for ln in lines if ln not in present]
    if not new:
        return existing
    if policy == "append":
        sep = "" if not existing or existing.endswith("\n") else "\n"
        return existing + sep + _text(new)
    return _text(new) + existing


def _text(lines: list[str]) -> str:
    return "".join(ln + "\n" for ln in lines)


def _read_existing(path: str) -> str | None | bool:
    """The file's text; None when there is none; False when it is not caption text."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIDECAR_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return False
    if len(data) > MAX_SIDECAR_BYTES:
        return False
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return False


class _Stage:
    """Lines waiting for the other rows of their file, on disk (temporary SQLite)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="caption-export-")
        self.db = sqlite3.connect(os.path.join(self.dir, "stage.db"))
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE",
                       "cache_size=-16384"):  # 16 MiB of cache, then SQLite uses the disk
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE s (target TEXT, image TEXT, rank INT, id TEXT, "
                        "seq INT, line TEXT)")
        self.pending: list[tuple[str, str, int, str, int, str]] = []

    def add(self, target: str, image: str, rank: int, rid: str, lines: list[str]) -> None:
        self.pending.extend((target, image, rank, rid, i, ln) for i, ln in enumerate(lines))
        if len(self.pending) >= _STAGE_ROWS:
            self._flush()

    def _flush(self) -> None:
        self.db.executemany("INSERT INTO s VALUES (?, ?, ?, ?, ?, ?)", self.pending)
        self.pending.clear()

    def groups(self) -> Iterator[tuple[str, set[str], list[str]]]:
        """(file, its images, its lines in prompt order) for every staged file."""
        self._flush()
        self.db.commit()
        rows = self.db.execute("SELECT target, image, line FROM s "
                               "ORDER BY target, rank, id, seq")
        for target, group in itertools.groupby(rows, key=lambda r: r[0]):
            items = list(group)
            yield target, {r[1] for r in items}, [r[2] for r in items]

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)
