"""``python -m pipeline report OUT``: a static, self-contained HTML gallery of a dataset.

One card per image, in manifest order: the picture once, and each prompt's caption
(or error) beside it; the manifest's columns shown and, where they have few values,
filterable; errors-only filter, search, sorting, and click to enlarge, all in inline
JS and CSS (see pipeline/report_page.py). The page is written to ``OUT/_report.html``
(or ``--html PATH``): a name no Parquet reader takes for data.

Memory stays bounded: the totals are streamed over every row, the first ``--limit``
images are chosen in one pass over the key columns (at most 2 x limit ids held), and
only their rows are read in a second pass. Relative image paths resolve against
``--manifest``'s folder, else the folder ``OUT/_dataset.json`` records for the
manifest, else the current folder. Opening the page as ``_report.html#selftest``
drives its controls and writes what it saw into ``<pre id=selftest>`` (for the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from html import escape
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ..records import BASE_NAMES
from ..sources.manifest_format import base_dir
from ..store.checkpoint import KeySet, key_hash
from .report_page import CSS, FOOT, card, controls, flags_of

WANTED = ["id", "prompt_name", "image", "status", "caption", "captions", "error",
          "error_class", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s",
          "dedup_of", "line", "quality_flags", "quality_notes", "reasks", "reask_flags"]
TOTALS = ["id", "status", "error_class", "prompt_tokens", "completion_tokens", "cost_usd"]
_MAX_FILTER_VALUES = 30    # a column with more distinct values is searched, not filtered
_MAX_PROMPTS_PER_CARD = 50
_NO_LINE = 1 << 62


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipeline report",
                description="Write a static, self-contained HTML gallery of an output "
                            "dataset: one card per image with each prompt's caption.")
    p.add_argument("out", type=Path, metavar="OUT", help="output dataset directory")
    p.add_argument("--manifest", type=Path,
                   help="the manifest; relative image paths resolve against its folder "
                        "(default: the folder OUT/_dataset.json records, else the current one)")
    p.add_argument("--html", type=Path, metavar="PATH",
                   help="where to write the page (default OUT/_report.html)")
    p.add_argument("--thumb-size", type=int, default=160, help="thumbnail edge, px (160)")
    p.add_argument("--large-size", type=int, default=640,
                   help="edge of the enlarged view, px (640; 0 = enlarge the thumbnail)")
    p.add_argument("--limit", type=int, default=1000,
                   help="images (cards) on the page at most (1000); totals cover all rows")
    return p


def _fail(message: str) -> int:
    print(f"report: error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- reading OUT


def _totals(dataset: ds.Dataset) -> dict[str, Any]:
    cols = [c for c in TOTALS if c in dataset.schema.names]
    t: dict[str, Any] = {"rows": 0, "status": Counter(), "classes": Counter(),
                         "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    images = KeySet()  # 8 bytes an id
    for b in dataset.to_batches(columns=cols, batch_size=8192):
        t["rows"] += b.num_rows
        d = b.to_pydict()
        t["status"].update(s or "none" for s in d["status"])
        t["classes"].update(c for c in d["error_class"] if c)
        for c in ("prompt_tokens", "completion_tokens", "cost_usd"):
            t[c] += sum(v for v in d.get(c, ()) if v is not None)
        for i in d["id"]:
            images.add(key_hash(i or "", ""))
    t["images"] = len(images)
    return t


def first_images(dataset: ds.Dataset, limit: int) -> list[str]:
    """The ids of the first ``limit`` images in manifest order (line, then id)."""
    if limit == 0:
        return []
    cols = ["id", "line"] if "line" in dataset.schema.names else ["id"]
    best: dict[str, tuple[int, str]] = {}  # id -> its smallest (line, id)
    cut: tuple[int, str] | None = None     # `limit` distinct ids sort before this
    for b in dataset.to_batches(columns=cols, batch_size=8192):
        lines = b.column("line").to_pylist() if "line" in cols else [None] * b.num_rows
        for rid, line in zip(b.column("id").to_pylist(), lines):
            k = (line if isinstance(line, int) else _NO_LINE, rid or "")
            if cut is not None and k >= cut:
                continue
            if k < best.get(k[1], (_NO_LINE + 1, "")):
                best[k[1]] = k
            if len(best) > 2 * limit:  # keep the first `limit`: memory stays 2 x limit
                kept = sorted(best.values())[:limit]
                best, cut = {k[1]: k for k in kept}, kept[-1]
    return [k[1] for k in sorted(best.values())[:limit]]


def _rows_of(dataset: ds.Dataset, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    cols = [c for c in dataset.schema.names if c in WANTED or c not in BASE_NAMES]
    wanted = pa.array(ids, pa.string())
    groups: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    scanner = dataset.scanner(columns=cols, filter=ds.field("id").isin(wanted),
                              batch_size=1024)
    for b in scanner.to_batches():
        for r in b.to_pylist():
            groups[r["id"]].append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: str(r.get("prompt_name") or ""))
    return groups


def newest_run(out: Path) -> dict[str, Any] | None:
    """The newest run report (run ids start with their UTC start time)."""
    runs = sorted((out / "_runs").glob("*.json"))
    if not runs:
        return None
    try:
        data = json.loads(runs[-1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    return data if isinstance(data, dict) else {"run_id": runs[-1].stem, "unreadable": True}


def image_base(out: Path, manifest: Path | None) -> tuple[Path, str]:
    """Where relative image paths resolve, and why: --manifest, else what
    OUT/_dataset.json records, else the current folder."""
    if manifest is not None:
        return base_dir(manifest).resolve(), "--manifest"
    record = out / "_dataset.json"
    try:
        doc = json.loads(record.read_text(encoding="utf-8"))
        found = doc["manifest"]["base_dir"]
    except FileNotFoundError:
        return Path.cwd(), "the current folder (OUT has no _dataset.json)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"{type(e).__name__}: {e}" if not isinstance(e, KeyError) else f"no {e}"
        print(f"report: note: {record} unusable ({why}); relative image paths resolve "
              "against the current folder", file=sys.stderr)
        return Path.cwd(), "the current folder (OUT/_dataset.json is unusable)"
    if not isinstance(found, str) or not os.path.isabs(found):
        print(f"report: note: {record}: manifest.base_dir is not an absolute path; relative "
              "image paths resolve against the current folder", file=sys.stderr)
        return Path.cwd(), "the current folder (OUT/_dataset.json has no usable base_dir)"
    return Path(found), "OUT/_dataset.json"


# --------------------------------------------------------------------------- the page


def _number(v: Any) -> float | None:
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def run_line(run: dict[str, Any]) -> str:
    """The newest run in one line: counts, errors by class, cost, duration."""
    bits = [f"newest run <b>{escape(str(run.get('run_id', '?')))}</b>"]
    if run.get("unreadable"):
        return bits[0] + " &middot; (unreadable run report)"
    if isinstance(run.get("started_at"), str):
        bits.append(f"started {escape(run['started_at'][:19].replace('T', ' '))} UTC")
    for key, label in (("exit_code", "exit"), ("ok", "ok"), ("failed", "failed"),
                       ("skipped_done", "already done")):
        if _number(run.get(key)) is not None:
            bits.append(f"{label} {run[key]}")
    classes = run.get("error_classes")
    if isinstance(classes, dict) and classes:
        bits.append("errors: " + ", ".join(f"{escape(str(k))} {escape(str(v))}"
                                           for k, v in sorted(classes.items())))
    if _number(run.get("cost_usd")) is not None:
        bits.append(f"cost ${run['cost_usd']:.4f}")
    if _number(run.get("wall_s")) is not None:
        bits.append(f"{run['wall_s']:.1f} s")
    for key in ("interrupted", "note"):
        if run.get(key):
            bits.append(f"{key}: {escape(str(run[key]))}")
    return " &middot; ".join(bits)


def _head(out: Path, t: dict[str, Any], run: dict[str, Any] | None, written: int,
          base: tuple[Path, str]) -> Iterator[str]:
    title = escape(f"Caption report: {out.resolve().name}")
    yield (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
           f"<title>{title}</title>\n<style>{CSS}</style></head><body>\n<h1>{title}</h1>\n")
    st = t["status"]
    other = t["rows"] - st["ok"] - st["error"]
    parts = [f"images <b>{t['images']}</b>", f"rows <b>{t['rows']}</b>",
             f"ok <b>{st['ok']}</b>", f"error <b>{st['error']}</b>"]
    parts += [f"other <b>{other}</b>"] if other else []
    parts.append(f"tokens in/out <b>{t['prompt_tokens']}</b> / <b>{t['completion_tokens']}</b>")
    parts.append(f"cost <b>${t['cost_usd']:.4f}</b>")
    yield f'<div class="totals">{"".join(f"<span>{p}</span>" for p in parts)}</div>\n'
    if t["classes"]:
        cls = ", ".join(f"{escape(k)}: {v}" for k, v in t["classes"].most_common())
        yield f'<div class="totals">error classes: {cls}</div>\n'
    if run:
        yield f'<div class="run">{run_line(run)}</div>\n'
    yield (f'<div class="base">relative image paths from {escape(str(base[0]))} '
           f"({escape(base[1])})</div>\n")
    if written < t["images"]:
        yield (f'<div class="warn">Showing the first {written} of {t["images"]} images '
               f"(--limit); the totals above cover all rows.</div>\n")


def _choices(groups: dict[str, list[dict[str, Any]]], extras: list[str]
             ) -> dict[str, list[tuple[str, int]]]:
    out = {}
    for col in extras:
        values = Counter("" if rows[0].get(col) is None else str(rows[0].get(col))
                         for rows in groups.values() if rows)
        if 1 < len(values) <= _MAX_FILTER_VALUES:
            out[col] = sorted(values.items())
    return out


def _qualities(groups: dict[str, list[dict[str, Any]]]
               ) -> tuple[list[tuple[str, int]], int, int]:
    """Cards per quality flag, cards with any flag, cards with a re-ask."""
    per: Counter[str] = Counter()
    flagged = reasked = 0
    for rows in groups.values():
        flags, asked = flags_of(rows)
        per.update(flags)
        flagged += bool(flags)
        reasked += asked
    return sorted(per.items()), flagged, reasked


def _dataset(out: Path) -> tuple[ds.Dataset, list[str]] | str:
    parts = sorted(p for p in out.glob("part-*.parquet") if p.is_file()) if out.is_dir() else []
    if not parts:
        return f"no part-*.parquet files in {out}"
    schemas = []
    for p in parts:
        try:
            schemas.append(pq.read_schema(p))
        except (OSError, pa.ArrowException) as e:
            return f"cannot read {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    try:
        schema = pa.unify_schemas(schemas)
    except pa.ArrowException as e:
        return f"the parts of {out} do not fit one schema: {str(e).splitlines()[0]}"
    for name, typ in (("id", pa.string()), ("status", pa.string()),
                      ("error_class", pa.string())):
        if name not in schema.names:
            schema = schema.append(pa.field(name, typ))
    extras = [n for n in schema.names if n not in BASE_NAMES]
    return ds.dataset([str(p) for p in parts], schema=schema, format="parquet"), extras


def main(argv: Sequence[str]) -> int:
    ns = _parser().parse_args(list(argv))
    if ns.thumb_size < 8 or ns.limit < 0 or ns.large_size < 0:
        return _fail("--thumb-size must be >= 8, --large-size and --limit >= 0")
    found = _dataset(ns.out)
    if isinstance(found, str):
        return _fail(found)
    dataset, extras = found
    dest = ns.html or ns.out / "_report.html"
    base = image_base(ns.out, ns.manifest)
    try:
        totals = _totals(dataset)
        groups = _rows_of(dataset, first_images(dataset, ns.limit))
    except (OSError, pa.ArrowException) as e:
        return _fail(f"cannot read {ns.out}: {str(e).splitlines()[0]}")
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(_head(ns.out, totals, newest_run(ns.out), len(groups), base))
            f.write(controls(_choices(groups, extras), len(groups), _qualities(groups)))
            for rows in groups.values():
                if rows:
                    f.write(card(rows[:_MAX_PROMPTS_PER_CARD], extras, base[0], ns.thumb_size,
                                 ns.large_size, max(0, len(rows) - _MAX_PROMPTS_PER_CARD)))
            f.write(FOOT)
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        return _fail(f"cannot write {dest}: {e.strerror or e}; pass --html PATH")
    print(f"report: {len(groups)} of {totals['images']} images ({totals['rows']} rows) "
          f"-> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
