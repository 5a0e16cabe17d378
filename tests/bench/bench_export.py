"""`make bench-export`: `python -m pipeline export` at 1 M rows, against the pandas script.

OUT is generated directly as Parquet with the pipeline's output schema (the same
generator as ``bench_scale``: every column filled as a run fills it, ~300-character
captions, parts of 250 000 rows in row groups of 20 000), one distinct image path per
row in folders of 1 000, plus a ``_dataset.json`` saying where those paths start.
Measured for JSONL and for mirrored sidecars (``--to DEST``, no image copies), at
``--small``, ``--mid`` and ``--rows`` rows, each run in its own process (``wait4``: wall
time and peak RSS of that process only):

* pipeline: ``python -m pipeline export OUT --to DEST --format jsonl|sidecar``;
* baseline: what most users would write (``BASELINE_*`` below, verbatim): ``pandas``
  reads the whole dataset, then ``to_json(lines=True)`` or one ``write_text`` per row.
  It does less (no duplicate keys resolved, no policy, no atomic rename), so speed
  ratios flatter it; its memory grows with the rows, the pipeline's does not.

    python tests/bench/bench_export.py [--rows 1000000] [--mid 100000] [--small 1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_client import PY, REPO, run_child  # noqa: E402
from bench_scale import PART_ROWS, finished_table  # noqa: E402

FORMATS = ("jsonl", "sidecar")
ROW_GROUP_ROWS = 20_000
BASELINE_JSONL = """\
import sys
import pandas as pd
out, dest = sys.argv[1:3]
df = pd.read_parquet(out)
df[df.status == "ok"].to_json(dest, orient="records", lines=True, date_format="iso")
"""
BASELINE_SIDECAR = """\
import sys
from pathlib import Path
import pandas as pd
out, dest = sys.argv[1:3]
df = pd.read_parquet(out, columns=["image", "caption", "status"])
for row in df[df.status == "ok"].itertuples():
    txt = Path(dest) / Path(row.image).with_suffix(".txt")
    txt.parent.mkdir(parents=True, exist_ok=True)
    txt.write_text(row.caption + "\\n", encoding="utf-8")
"""


@dataclass
class Sample:
    fmt: str
    rows: int
    tool: str
    wall_s: float
    maxrss_mb: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s else 0.0


def make_out(root: Path, rows: int) -> Path:
    """OUT with ``rows`` finished rows, image i at d<i // 1000>/<i>.png, in parts of
    250 000 rows made of row groups of 20 000 (the sink merges parts below 20 000 rows
    into parts of at most 500 000, one row group per merged part)."""
    from pipeline.records import output_schema

    out = root / f"out-{rows}"
    out.mkdir(parents=True)
    images = [f"d{i // 1000:04d}/{i:07d}.png" for i in range(rows)]
    schema = output_schema([])
    for k, start in enumerate(range(0, rows, PART_ROWS)):
        t = finished_table(schema, start, min(PART_ROWS, rows - start), images, seed=k)
        pq.write_table(t, out / f"part-20260101T000000-bench00-m{k + 1:03d}.parquet",
                       compression="zstd", row_group_size=ROW_GROUP_ROWS)
    record = {"version": 1, "prompts": {}, "history": [],
              "manifest": {"path": str(root / "images.csv"), "base_dir": str(root / "img"),
                           "columns": ["id", "image"]}}
    (out / "_dataset.json").write_text(json.dumps(record), encoding="utf-8")
    return out


def _argv(tool: str, fmt: str, out: Path, dest: Path, scripts: Path) -> list[str]:
    if tool == "pipeline":
        return [PY, "-m", "pipeline", "export", str(out), "--to", str(dest), "--format",
                fmt, "--no-progress"]
    return [PY, str(scripts / f"baseline_{fmt}.py"), str(out), str(dest)]


def measure(root: Path, out: Path, rows: int, fmt: str, tool: str, repeats: int,
            log: object = print) -> Sample:
    scripts = root / "scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "baseline_jsonl.py").write_text(BASELINE_JSONL, encoding="utf-8")
    (scripts / "baseline_sidecar.py").write_text(BASELINE_SIDECAR, encoding="utf-8")
    walls, rss = [], []
    for _ in range(repeats):
        dest = root / (f"dest-{fmt}.jsonl" if fmt == "jsonl" else f"dest-{fmt}")
        shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(True)
        child = run_child(_argv(tool, fmt, out, dest, scripts), cwd=REPO, timeout=3600)
        if child.returncode != 0:
            raise RuntimeError(f"{tool} {fmt} exited {child.returncode}: {child.stderr}")
        _check(dest, fmt, rows)
        walls.append(child.wall_s)
        rss.append(child.maxrss_mb)
        shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(True)
    s = Sample(fmt, rows, tool, statistics.median(walls), max(rss))
    print(f"  {fmt:8} {rows:>9,} rows  {tool:8}  {s.wall_s:7.2f} s  "
          f"{s.rows_per_s:>10,.0f} rows/s  {s.maxrss_mb:6.0f} MB", file=sys.stderr)
    return s


def _check(dest: Path, fmt: str, rows: int) -> None:
    """Every row arrived (the count only; the tests check the contents)."""
    if fmt == "jsonl":
        with dest.open("rb") as f:
            n = sum(1 for _ in f)
    else:
        n = sum(1 for _ in dest.rglob("*.txt"))
    if n != rows:
        raise RuntimeError(f"{fmt}: {n} rows written, {rows} expected")


def table(samples: list[Sample], small: int, large: int) -> str:
    by = {(s.fmt, s.rows, s.tool): s for s in samples}
    lines = ["| format | rows | tool | wall s | rows/s | peak RSS MB |",
             "|---|---:|---|---:|---:|---:|"]
    for s in samples:
        lines.append(f"| {s.fmt} | {s.rows:,} | {s.tool} | {s.wall_s:.2f} | "
                     f"{s.rows_per_s:,.0f} | {s.maxrss_mb:.0f} |")
    for fmt in dict.fromkeys(s.fmt for s in samples):
        p, b = by.get((fmt, large, "pipeline")), by.get((fmt, large, "baseline"))
        ps = by.get((fmt, small, "pipeline"))
        if p and b:
            lines.append(f"| **{fmt}: pipeline / baseline** | {large:,} | | | "
                         f"{p.rows_per_s / b.rows_per_s:.2f}x | "
                         f"{p.maxrss_mb / b.maxrss_mb:.2f}x |")
        if p and ps:
            lines.append(f"| **{fmt}: pipeline RSS at {large:,} / at {small:,}** | | | | | "
                         f"{p.maxrss_mb / ps.maxrss_mb:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the large OUT")
    p.add_argument("--small", type=int, default=1000, help="rows of the small OUT")
    p.add_argument("--mid", type=int, default=100_000,
                   help="rows of a middle OUT, to show where memory levels off (0: none)")
    p.add_argument("--repeats", type=int, default=1, help="runs per cell (median wall)")
    p.add_argument("--formats", default=",".join(FORMATS), help="jsonl,sidecar")
    p.add_argument("--no-baseline", action="store_true", help="the pipeline only")
    ns = p.parse_args(argv)
    formats = [f for f in ns.formats.split(",") if f]
    tools = ["pipeline"] + ([] if ns.no_baseline else ["baseline"])
    samples = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        for rows in [n for n in (ns.small, ns.mid, ns.rows) if n]:
            print(f"generating OUT with {rows:,} rows ...", file=sys.stderr)
            out = make_out(root, rows)
            for fmt in formats:
                for tool in tools:
                    samples.append(measure(root, out, rows, fmt, tool, ns.repeats))
            shutil.rmtree(out)
    sizes = ", ".join(f"{n:,}" for n in (ns.small, ns.mid, ns.rows) if n)
    print(f"\nexport of a finished OUT ({sizes} rows), one process per run, peak RSS "
          "from wait4\n")
    print(table(samples, ns.small, ns.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
