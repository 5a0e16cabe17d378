"""`python -m pipeline status OUT [--manifest M]`: what OUT holds and what the last runs did.

Read-only: it never repairs or locks OUT, so it is safe beside a running job.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..batch.ledger import Ledger
from ..errors import TRANSIENT, RunFatal
from ..keys import KeySet, key_hashes
from ..sources.base import Source
from ..sources.choose import open_source
from ..sources.manifest_format import SOURCE_KINDS, ManifestFormat
from ..sources.plan import NamedPrompt, Plan, PlanCounts
from ..store.checkpoint import Checkpoint
from ..store.outdir import QUARANTINE, RUNS, check_part, part_files


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline status")
    p.add_argument("out", type=Path, help="the output dataset directory")
    p.add_argument("--manifest", type=Path, help="count the manifest's pending rows too")
    p.add_argument("--runs", type=int, default=5, help="how many recent runs to list (5)")
    p.add_argument("--delimiter", help="the manifest's separator (default: detected)")
    p.add_argument("--image-column", default="image", help="as for caption ('image')")
    p.add_argument("--id-column", default="id", help="as for caption ('id')")
    p.add_argument("--format", choices=SOURCE_KINDS, help="as for caption (default: detected)")
    ns = p.parse_args(argv)
    if not ns.out.is_dir():
        print(f"error: {ns.out} is not a directory", file=sys.stderr)
        return 2
    quality = Quality()
    names, counts, classes, unreadable = _scan(ns.out, quality)
    transient = sum(n for c, n in classes.items() if c in TRANSIENT)
    print(f"{ns.out}: {counts['ok']} ok, {counts['error']} failed"
          + (f" ({', '.join(f'{k}={v}' for k, v in classes.most_common())})" if classes else "")
          + (f"; {transient} transient, captioned again by the next run" if transient else ""))
    if quality.line():
        print(quality.line())
    for part, reason in unreadable:
        print(f"unreadable part {part}: {reason} (the next run moves it to {QUARANTINE}/)")
    quarantined = sorted((ns.out / QUARANTINE).glob("*")) if (ns.out / QUARANTINE).is_dir() \
        else []
    for q in quarantined:
        print(f"quarantined: {q}")
    if ns.manifest is not None:
        try:
            fmt = ManifestFormat.parse(ns.delimiter, ns.image_column, ns.id_column, ns.format)
            pending, total = _pending(ns.out, open_source(ns.manifest, fmt),
                                      names or {"default"})
        except RunFatal as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 2
        print(f"{ns.manifest}: {total} rows x {len(names or {'default'})} prompt(s), "
              f"{pending} pending")
    for line in batch_lines(ns.out):
        print(line)
    for line in _runs(ns.out, ns.runs):
        print(line)
    return 0


def batch_lines(out: Path) -> list[str]:
    """The batch lane's ledger: a count per state, then one line per batch in flight."""
    entries = list(Ledger(out / "_batches").entries())
    if not entries:
        return []
    states = Counter(e.state for e in entries)
    lines = ["batches: " + ", ".join(f"{n} {k}" for k, n in sorted(states.items()))]
    for e in entries:
        if e.in_flight:
            lines.append(f"  batch {e.lid} {e.batch_id or '(not created yet)'}: {e.state}"
                         f"{f' ({e.status})' if e.status else ''}, {e.requests} requests, "
                         f"{e.bytes} bytes, est. ${e.est_cost_usd:.4f}")
    return lines


@dataclass
class Quality:
    """The quality gate's marks in OUT: flags of kept captions, re-asks, their cost."""

    flags: Counter[str] = field(default_factory=Counter)
    flagged_rows: int = 0
    reasked: int = 0
    fixed: int = 0       # re-asked rows whose kept caption passes every check
    reask_cost: float = 0.0

    def add(self, t: pa.Table) -> None:
        if "quality_flags" in t.column_names:
            flags = t["quality_flags"]
            self.flagged_rows += int(pc.sum(pc.greater(pc.list_value_length(flags), 0)
                                            .fill_null(False)).as_py() or 0)
            for name, n in zip(*_value_counts(pa.table({"f": pc.list_flatten(flags)}), "f")):
                if name:
                    self.flags[name] += n
        if "reasks" in t.column_names:
            asked = pc.greater(t["reasks"].fill_null(0), 0)
            self.reasked += int(pc.sum(asked).as_py() or 0)
            if "quality_flags" in t.column_names:
                clean = pc.equal(pc.list_value_length(t["quality_flags"]).fill_null(1), 0)
                ok = pc.equal(t["status"], "ok").fill_null(False)
                self.fixed += int(pc.sum(pc.and_(pc.and_(asked, clean), ok)).as_py() or 0)
        if "reask_cost_usd" in t.column_names:
            self.reask_cost += float(pc.sum(t["reask_cost_usd"]).as_py() or 0.0)

    def line(self) -> str:
        if not (self.flagged_rows or self.reasked):
            return ""
        flags = ", ".join(f"{k}={v}" for k, v in self.flags.most_common())
        return (f"quality: {self.flagged_rows} rows flagged" + (f" ({flags})" if flags else "")
                + f"; {self.reasked} re-asked (${self.reask_cost:.4f}), {self.fixed} of them "
                  "passed after the re-ask")


def _scan(out: Path, quality: Quality | None = None
          ) -> tuple[set[str], Counter[str], Counter[str], list[tuple[Path, str]]]:
    """Prompt names, status and error-class counts of the readable parts (vectorised)."""
    names: set[str] = set()
    counts: Counter[str] = Counter(ok=0, error=0)
    classes: Counter[str] = Counter()
    unreadable = []
    for part in part_files(out):
        reason = check_part(part)
        if reason is None:
            try:
                pf = pq.ParquetFile(part)
                cols = [c for c in ("prompt_name", "status", "error_class", "quality_flags",
                                    "reasks", "reask_cost_usd")
                        if c in pf.schema_arrow.names]
                t = pf.read(columns=cols)
            except (OSError, pa.ArrowException) as e:
                reason = f"unreadable ({e})"
        if reason is not None:
            unreadable.append((part, reason))
            continue
        names.update(n or "" for n in pc.unique(t["prompt_name"]).to_pylist())
        if quality is not None:
            quality.add(t)
        for status, n in zip(*_value_counts(t, "status")):
            counts[status or "?"] += n
        if "error_class" in t.column_names:
            for cls, n in zip(*_value_counts(t, "error_class")):
                if cls:
                    classes[cls] += n
    return names, counts, classes, unreadable


def _value_counts(t: pa.Table, column: str) -> tuple[list[str | None], list[int]]:
    vc = pc.value_counts(t[column])
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def _pending(out: Path, manifest: Source, names: set[str]) -> tuple[int, int]:
    """(keys pending, distinct manifest rows): pending as the next run's planner sees it
    (transient error rows are pending again), from the same planner."""
    done = Checkpoint(out).scan().done(retry_errors=False)
    counts = PlanCounts()
    plan = Plan(manifest, done, tuple(NamedPrompt(n, "") for n in sorted(names)), None,
                counts)
    for _ in plan:
        pass
    fmt = getattr(manifest, "fmt", None)
    return counts.pending, _distinct_rows(open_source(manifest.path, fmt))


def _distinct_rows(manifest: Source) -> int:
    """Manifest rows with an id not seen on an earlier line (8 bytes an id)."""
    ids, rows, it = KeySet(), 0, iter(manifest)
    while block := list(islice(it, 4096)):
        fresh = np.unique(key_hashes((r.id for r in block), ""))
        new = fresh[~ids.contains_many(fresh)]
        rows += len(new)
        ids.add_batch(new)
    return rows


def _runs(out: Path, n: int) -> list[str]:
    lines = []
    for path in sorted((out / RUNS).glob("*.json"))[-n:]:
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        lines.append(f"run {r.get('run_id')}: started {r.get('started_at', '?')[:19]}, "
                     f"exit {r.get('exit_code')}, ok={r.get('ok')} failed={r.get('failed')} "
                     f"skipped={r.get('skipped_done')}, {r.get('wall_s')} s, "
                     f"cost ${r.get('cost_usd') or 0:.4f}"
                     + (f" ({r['note']})" if r.get("note") else ""))
    return lines
