"""``--format jsonl`` and ``--format csv``: one line per key, for people and scripts.

``--to FILE``. The ``image`` column is the image's absolute path (resolved against the
manifest's folder; left as it is when that folder is unknown) or its URL. JSONL keeps
types (``captions`` is a list, timestamps are ISO 8601, missing values are ``null``);
CSV writes lists as JSON text, missing values as empty cells, booleans as
``true``/``false``. The file is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from .base import Job, Writer, json_columns, jsonable, tmp_path, with_trigger

__all__ = ["JsonlWriter", "CsvWriter"]


class _FileWriter(Writer):
    dest_is_file = True

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        assert self.spec.dest is not None
        self.final = self.spec.dest
        self.tmp = tmp_path(self.final)
        self.convert = json_columns(job.committed.schema, job.columns)

    def prepare(self) -> None:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "w", encoding="utf-8", newline="")

    def record(self, r: dict[str, Any]) -> dict[str, Any]:
        rec = {c: jsonable(r[c]) if conv else r[c] for c, conv in self.convert}
        if "image" in rec:
            ref = self.job.resolver.resolve(rec["image"], strict=False)
            rec["image"] = ref.path if ref.path is not None else ref.value
        return with_trigger(rec, self.spec.trigger)

    def finish(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        if hasattr(self, "f"):
            self.f.close()
        self.tmp.unlink(missing_ok=True)


class JsonlWriter(_FileWriter):
    name = "jsonl"

    def write(self, rows: list[dict[str, Any]]) -> None:
        dumps, w = json.dumps, self.f.write
        for r in rows:
            w(dumps(self.record(r), ensure_ascii=False) + "\n")
        self.job.summary.written += len(rows)


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return v


class CsvWriter(_FileWriter):
    name = "csv"

    def prepare(self) -> None:
        super().prepare()
        self.csv = csv.writer(self.f)
        self.csv.writerow(self.job.columns)

    def write(self, rows: list[dict[str, Any]]) -> None:
        cols = self.job.columns
        for r in rows:
            rec = self.record(r)
            self.csv.writerow([_cell(rec[c]) for c in cols])
        self.job.summary.written += len(rows)
