"""`make bench-sources`: reading every kind of source, rows/s and peak RSS, against CSV.

Two measurements per input, each a process of its own (``wait4``: peak RSS of that
process only; rows/s from opening the source to the last row, imports excluded):

* *read*: the source alone, every row produced as the planner asks for it (nothing
  done yet, so every embedded image is read): the acceptance figure, memory flatness
  is the ratio of the peaks at the large and the small size;
* *planned*: through the one planner (``sources.plan.Plan``, one prompt), every row
  keyed, checked for duplicate ids and prompted, as a run reads it. Duplicate ids are
  found across the whole input, so the planner keeps 8 bytes per pending id (plus
  NumPy's merge temporaries): its memory grows with the pending rows by design.

Inputs:

* CSV (the path every other source is compared with), JSONL and Parquet manifests of
  ``--rows`` rows (id, image path, two extra columns) and ``--small`` rows;
* WebDataset: ``--shards`` shards of ``--members`` samples (a real JPEG, ``.json`` and
  ``.txt`` members each, as img2dataset writes them; the JPEG bytes are read into the
  rows), against one shard.

    python tests/bench/bench_sources.py [--rows 1000000] [--small 1000] [--shards 100]
                                        [--members 1000]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_client import PY, REPO, run_child  # noqa: E402

READER = """\
import sys, time
from pipeline.keys import KeySet
from pipeline.sources.choose import open_source
from pipeline.sources.plan import NamedPrompt, Plan
import pipeline.sources.jsonl, pipeline.sources.parquet, pipeline.sources.webdataset
t0 = time.perf_counter()
source = open_source(sys.argv[1])
if sys.argv[2] == "source":  # the source alone: every row, images read (all pending)
    rows = sum(1 for _ in source.rows(lambda rid: True))
else:  # through the planner, as a run reads it (keys, duplicate ids, prompts)
    plan = Plan(source, KeySet(), (NamedPrompt("default", "Describe the image."),), None)
    rows = sum(len(group) for group in plan)
print(rows, time.perf_counter() - t0)
"""


@dataclass
class Sample:
    kind: str
    mode: str       # "source" or "plan"
    rows: int
    wall_s: float   # the whole process, interpreter start included
    read_s: float   # from opening the source to the last row (imports excluded)
    rss_mb: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.read_s if self.read_s else 0.0


def _fields(i: int) -> tuple[str, str, str, str]:
    return f"r{i:08d}", f"img/{i // 1000:05d}/{i:08d}.jpg", f"tag{i % 17}", \
        f"https://example.com/{i}.jpg"


def write_csv(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8") as f:
        f.write("id,image,tag,url\n")
        for i in range(rows):
            f.write(",".join(_fields(i)) + "\n")
    return path


def write_jsonl(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            rid, image, tag, url = _fields(i)
            f.write(json.dumps({"id": rid, "image": image, "tag": tag, "url": url}) + "\n")
    return path


def write_parquet(path: Path, rows: int) -> Path:
    writer = None
    step = 100_000
    for start in range(0, rows, step):
        cols = list(zip(*(_fields(i) for i in range(start, min(rows, start + step)))))
        table = pa.table({"id": cols[0], "image": cols[1], "tag": cols[2], "url": cols[3]})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    return path


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 80, 40)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def write_shards(folder: Path, shards: int, members: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = _jpeg()

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for i in range(members):
                key = f"{s:05d}{i:04d}"
                add(tf, f"{key}.jpg", jpeg)
                add(tf, f"{key}.json", json.dumps({"url": f"https://e.com/{key}.jpg",
                                                   "width": 32, "height": 24}).encode())
                add(tf, f"{key}.txt", f"alt text {key}".encode())
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def measure(kind: str, source: str, rows: int, scripts: Path) -> list[Sample]:
    out = []
    for mode in ("source", "plan"):
        child = run_child([PY, str(scripts / "read.py"), source, mode], cwd=REPO,
                          timeout=1800)
        got, read_s = child.stdout.split()[:2]
        assert int(got) == rows, f"{kind} {mode}: read {got} rows, expected {rows}"
        s = Sample(kind, mode, rows, child.wall_s, float(read_s), child.maxrss_mb)
        print(f"  {kind:11} {mode:6} {rows:>9,} rows  {s.read_s:7.2f} s  "
              f"{s.rows_per_s:>10,.0f} rows/s  {s.rss_mb:6.0f} MB", file=sys.stderr)
        out.append(s)
    return out


def table(samples: list[Sample]) -> str:
    by = {(s.kind, s.mode, s.rows): s for s in samples}
    csv_rows = max(s.rows for s in samples if s.kind == "csv")
    csv_read, csv_plan = by[("csv", "source", csv_rows)], by[("csv", "plan", csv_rows)]
    lines = ["| source | rows | read rows/s | vs CSV | read peak RSS MB | large / small "
             "| planned rows/s | vs CSV | planned peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("csv", "jsonl", "parquet", "webdataset"):
        sizes = sorted({r for k, m, r in by if k == kind})
        if not sizes:
            continue
        small = by[(kind, "source", sizes[0])]
        for rows in sizes:
            read, plan = by[(kind, "source", rows)], by[(kind, "plan", rows)]
            flat = f"{read.rss_mb / small.rss_mb:.2f}x" if rows != sizes[0] else ""
            lines.append(
                f"| {kind} | {rows:,} | {read.rows_per_s:,.0f} | "
                f"{read.rows_per_s / csv_read.rows_per_s:.2f}x | {read.rss_mb:.0f} | {flat} "
                f"| {plan.rows_per_s:,.0f} | {plan.rows_per_s / csv_plan.rows_per_s:.2f}x | "
                f"{plan.rss_mb:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=1_000)
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--members", type=int, default=1_000)
    ns = p.parse_args(argv)
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as tmp:
        root = Path(tmp)
        scripts = root / "scripts"
        scripts.mkdir()
        (scripts / "read.py").write_text(READER)
        for rows in (ns.small, ns.rows):
            print(f"generating manifests of {rows:,} rows ...", file=sys.stderr)
            made = {"csv": write_csv(root / f"m{rows}.csv", rows),
                    "jsonl": write_jsonl(root / f"m{rows}.jsonl", rows),
                    "parquet": write_parquet(root / f"m{rows}.parquet", rows)}
            for kind, path in made.items():
                samples += measure(kind, str(path), rows, scripts)
                path.unlink()
        for shards in (1, ns.shards):
            print(f"generating {shards} shards of {ns.members:,} samples ...", file=sys.stderr)
            pattern = write_shards(root / f"shards{shards}", shards, ns.members)
            samples += measure("webdataset", pattern, shards * ns.members, scripts)
            shutil.rmtree(root / f"shards{shards}")
    print(f"\nreading sources, one process per measurement (rows/s from opening the source "
          f"to the last row; peak RSS of that process); webdataset: {ns.shards} shards of "
          f"{ns.members:,} samples against 1 shard")
    print(table(samples))
    worst = max(by_large / by_small for by_small, by_large in _pairs(samples))
    verdict = "flat" if worst <= 1.2 else "NOT flat"
    print(f"\nmemory while reading: largest / smallest peak RSS at most {worst:.2f}x "
          f"({verdict}; the acceptance bound is 1.2x)")
    return 0


def _pairs(samples: list[Sample]) -> list[tuple[float, float]]:
    out = []
    for kind in {s.kind for s in samples}:
        mine = sorted((s for s in samples if s.kind == kind and s.mode == "source"),
                      key=lambda s: s.rows)
        out.append((mine[0].rss_mb, mine[-1].rss_mb))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
