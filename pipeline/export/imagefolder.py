"""``--format hf-imagefolder``: images plus ``metadata.jsonl``, Hugging Face's imagefolder.

``datasets.load_dataset("imagefolder", data_dir=DEST)`` gives an ``image`` feature and
one column per exported column. DEST holds each image at its path relative to the
manifest's folder (``--images copy``, the default, or ``hardlink`` / ``symlink``) and
``metadata.jsonl`` with one line per exported row: ``file_name`` (that path) first,
then the columns. Several prompt names of one image are several lines with the same
``file_name`` (one example each; pick one with ``--prompt-name``). http(s) images and
missing files are skipped and counted: the format needs the file.

``metadata.jsonl`` is written to a temporary file and renamed at the end, so a killed
export leaves no half-written metadata; images already placed stay, and a re-export
(``--force``) does not copy them again.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .base import (
    ExportError,
    Job,
    Writer,
    json_columns,
    jsonable,
    tmp_path,
    with_trigger,
    write_atomic,
)
from .embedded import Embedded
from .images import ImageRef, place

__all__ = ["ImageFolderWriter", "local_file"]

METADATA = "metadata.jsonl"
MAX_EMBEDDED_BYTES = 256 * 1024 * 1024  # an image read out of the source, at most


def local_file(ref: ImageRef, summary: Any) -> bool:
    """True when ``ref`` is an existing local file; otherwise counts why it is skipped."""
    reason = ref.skip_reason
    if reason is not None:
        summary.skip(reason, ref.value)
        return False
    assert ref.path is not None
    if not os.path.isfile(ref.path) or not os.access(ref.path, os.R_OK):
        summary.skip("missing or unreadable image files", ref.path)
        return False
    return True


class ImageFolderWriter(Writer):
    name = "hf-imagefolder"
    reserved = frozenset({"file_name", "image"})  # imagefolder makes `image` from file_name

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.embedded = Embedded(MAX_EMBEDDED_BYTES)
        if self.spec.images == "none":
            raise ExportError("--format hf-imagefolder needs the images in DEST: "
                              "--images copy, hardlink or symlink")
        assert self.spec.dest is not None
        self.dest = self.spec.dest
        self.final = self.dest / METADATA
        self.tmp = tmp_path(self.final)
        self.cols = json_columns(job.committed.schema,
                                 [c for c in job.columns if c not in self.reserved])

    def prepare(self) -> None:
        self.dest.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "w", encoding="utf-8")

    def write(self, rows: list[dict[str, Any]]) -> None:
        s = self.job.summary
        for r in rows:
            rel = self._place(r)
            if rel is None:
                continue
            rec = {"file_name": rel,
                   **{c: jsonable(r[c]) if conv else r[c] for c, conv in self.cols}}
            self.f.write(json.dumps(with_trigger(rec, self.spec.trigger),
                                    ensure_ascii=False) + "\n")
            s.written += 1

    def _place(self, r: dict[str, Any]) -> str | None:
        """Put the row's image under DEST; its path there, or None (skipped, counted)."""
        s = self.job.summary
        found = self.embedded.find(r)
        if found is not None:  # inside the source: written out of it (docs/protocol.md §13)
            if found.data is None:
                s.skip(found.why, found.rel)
                return None
            dst = self.dest / found.rel
            if not (dst.is_file() and dst.stat().st_size == len(found.data)):
                dst.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(dst, found.data)
                s.images += 1
            return found.rel
        ref = self.job.resolver.resolve(r.get("image"))
        if not local_file(ref, s):
            return None
        assert ref.path is not None and ref.rel is not None
        if ref.rel == METADATA:
            s.skip(f"images named {METADATA}", ref.path)
            return None
        s.images += place(ref.path, self.dest / ref.rel, self.spec.images)
        return ref.rel

    def finish(self) -> None:
        self.embedded.close()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        self.embedded.close()
        if hasattr(self, "f"):
            self.f.close()
        self.tmp.unlink(missing_ok=True)
