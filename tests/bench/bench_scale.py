"""`make bench` parts 2 and 3: memory with a 1 M-row manifest, and resume with 1 M rows done.

2. Memory at scale: the same run (``--limit`` rows captioned against the simulator,
   in its own process) over a 1 000-row manifest and over a generated 1 000 000-row
   manifest (image paths repeat); peak RSS of the client process (``wait4``). The
   small manifest has fewer rows than the limit, so the large run captions more:
   the comparison can only flatter the small one.
3. Resume at scale: OUT holding N finished rows, generated directly as Parquet with
   the pipeline's output schema in a few large part files (the size merged parts
   reach), and a manifest of those N rows plus 10 pending ones at its end. Measured:
   time from spawning the client to the first request reaching the simulator (which
   runs in this process, on its own thread, and timestamps admissions), the whole
   run, and the client's peak RSS. OUT is restored after every run.

    python tests/bench/bench_scale.py [--rows 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_client import (  # noqa: E402
    REPO,
    SimProcess,
    make_images,
    pipeline_argv,
    run_child,
    targets_table,
    write_manifest,
)

PENDING = 10
PART_ROWS = 250_000


# ---------------------------------------------------------------- a finished OUT


def _fixed_strings(values: np.ndarray) -> pa.Array:
    """A string array from a NumPy ``S<n>`` array, without a Python object per row."""
    width = values.dtype.itemsize
    offsets = np.arange(0, (len(values) + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets),
                                       pa.py_buffer(values.tobytes()))


def _ids(start: int, n: int) -> pa.Array:
    return _fixed_strings(np.char.add(b"r", np.char.zfill(
        np.arange(start, start + n).astype("S7"), 7)))


def _hex(rng: np.random.Generator, n: int, chars: int) -> pa.Array:
    raw = rng.integers(0, 16, size=(n, chars), dtype=np.uint8)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[raw]
    return _fixed_strings(digits.view(f"S{chars}").reshape(n))


def _repeat(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    return pa.repeat(pa.scalar(value, type_), n)


_CAPTIONS = [
    ("A {w}x{w} RGB PNG photograph dominated by {c} tones, with even lighting across the "
     "frame. The overall contrast is moderate. ") * 3,
    ("{C} tones dominate this {w}x{w} RGB PNG image, with brighter areas toward the top. "
     "The overall contrast is low. ") * 3,
]
_COLOURS = ["red and white", "blue, grey and black", "green and beige", "navy and silver"]


def finished_table(schema: pa.Schema, start: int, n: int, images: list[str],
                   seed: int) -> pa.Table:
    """``n`` ok rows r<start>..: every column of the output schema, as a run writes it."""
    rng = np.random.default_rng(seed)
    idx = np.arange(start, start + n)
    image = pa.array(images).take(pa.array(idx % len(images)))
    variants = [t.format(w=64, c=c, C=c[:1].upper() + c[1:])
                for t in _CAPTIONS for c in _COLOURS]
    caption = pa.array(variants).take(pa.array(idx % len(variants)))
    completion = rng.integers(80, 120, n)
    cols: dict[str, pa.Array] = {
        "id": _ids(start, n),
        "prompt_name": _repeat("default", n, pa.string()),
        "image": image,
        "caption": caption,
        "captions": pa.ListArray.from_arrays(np.arange(n + 1, dtype=np.int32), caption),
        "status": _repeat("ok", n, pa.string()),
        "finish_reason": _repeat("stop", n, pa.string()),
        "finish_reason_raw": _repeat("stop", n, pa.string()),
        "model": _repeat("claude-3-5-sonnet-20240620", n, pa.string()),
        "prompt_tokens": pa.array(np.full(n, 42)),
        "completion_tokens": pa.array(completion),
        "total_tokens": pa.array(completion + 42),
        "cached_tokens": pa.array(np.zeros(n, dtype=np.int64)),
        "cost_usd": pa.array(completion * 15e-6 + 42 * 3e-6),
        "usage_source": _repeat("reported", n, pa.string()),
        "attempts": pa.array(np.ones(n, dtype=np.int32)),
        "latency_s": pa.array(rng.gamma(4, 0.5, n)),
        "ttft_s": pa.array(rng.gamma(2, 0.2, n)),
        "request_id": _hex(rng, n, 24),
        "response_id": _hex(rng, n, 29),
        "http_status": pa.array(np.full(n, 200, dtype=np.int32)),
        "terminal": _repeat("done", n, pa.string()),
        "line": pa.array(idx + 2),
        "width": pa.array(np.full(n, 64, dtype=np.int32)),
        "height": pa.array(np.full(n, 64, dtype=np.int32)),
        "sent_width": pa.array(np.full(n, 64, dtype=np.int32)),
        "sent_height": pa.array(np.full(n, 64, dtype=np.int32)),
        "sent_bytes": pa.array(rng.integers(200, 2000, n)),
        "image_sha256": _hex(rng, n, 64),
        "dedup_key": _hex(rng, n, 32),  # distinct images: the largest dedupe index
        "finished_at": pa.array(1_764_000_000_000_000 + idx * 1000,
                                pa.timestamp("us", tz="UTC")),
    }
    arrays = [cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def write_finished_out(out: Path, rows: int, images: list[str],
                       part_rows: int = PART_ROWS) -> list[Path]:
    """OUT with ``rows`` finished rows in parts of ``part_rows`` (how merges leave it)."""
    from pipeline.records import output_schema

    out.mkdir(parents=True, exist_ok=True)
    schema = output_schema([])
    parts = []
    for k, start in enumerate(range(0, rows, part_rows)):
        t = finished_table(schema, start, min(part_rows, rows - start), images, seed=k)
        p = out / f"part-20260101T000000-bench00-m{k + 1:03d}.parquet"
        pq.write_table(t, p, compression="zstd")
        parts.append(p)
    return parts


def restore(out: Path, keep: list[Path]) -> None:
    """Remove what a run added (its part, its report), so the next run starts alike."""
    keep_set = set(keep)
    for p in out.iterdir():
        if p.is_dir():
            for q in p.iterdir():
                q.unlink()
            p.rmdir()
        elif p not in keep_set:
            p.unlink()


# ---------------------------------------------------------------- part 2: memory


@dataclass
class MemSample:
    manifest_rows: int
    captioned: int
    wall_s: float
    maxrss_mb: float
    cpu_s: float


def bench_memory(small: int = 1000, large: int = 1_000_000, limit: int = 2000,
                 repeats: int = 3, concurrency: int = 64, log: Any = print
                 ) -> list[MemSample]:
    samples = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        images = make_images(work / "img", min(limit, large))
        manifests = {n: write_manifest(work / f"m{n}.csv", n, images) for n in (small, large)}
        with SimProcess() as sim:
            for rep in range(repeats):
                for n, manifest in manifests.items():
                    out = work / f"out-{n}-{rep}"
                    child = run_child(pipeline_argv(manifest, out, sim.url, concurrency,
                                                    "--limit", str(limit)), REPO)
                    if child.returncode != 0:
                        raise RuntimeError(f"exit {child.returncode}: {child.stderr}")
                    done = pq.ParquetDataset(out).read(columns=["id"]).num_rows
                    s = MemSample(n, done, child.wall_s, child.maxrss_mb, child.cpu_s)
                    samples.append(s)
                    log(f"  manifest {n:>9,} rows, {done} captioned, run {rep + 1}/{repeats}: "
                        f"{s.maxrss_mb:5.0f} MB peak, {s.wall_s:5.1f} s", flush=True)
    return samples


# ---------------------------------------------------------------- part 3: resume


@dataclass
class ResumeSample:
    done_rows: int
    first_request_s: float
    wall_s: float
    maxrss_mb: float
    cpu_s: float


def bench_resume(sizes: tuple[int, ...] = (1000, 1_000_000), repeats: int = 3,
                 log: Any = print) -> list[ResumeSample]:
    from pipeline.simulator.app import SimConfig
    from pipeline.simulator.thread import SimThread

    samples = []
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        work = Path(tmp)
        images = make_images(work / "img", PENDING)
        rel = [f"img/{p.name}" for p in images]
        for n in sizes:
            t0 = time.monotonic()
            out = work / f"out-{n}"
            keep = write_finished_out(out, n, rel)
            manifest = write_manifest(work / f"m{n}.csv", n + PENDING, images)
            log(f"  generated OUT with {n:,} finished rows in {len(keep)} parts "
                f"({sum(p.stat().st_size for p in keep) / 1e6:.0f} MB) and a {n + PENDING:,}-row "
                f"manifest in {time.monotonic() - t0:.1f} s", flush=True)
            for rep in range(repeats):
                sim = SimThread(SimConfig(latency=0, tokens_per_second=0))
                try:
                    url = f"http://127.0.0.1:{sim.port}/v1"
                    child = run_child(pipeline_argv(manifest, out, url, 16), REPO)
                    first = min(sim.stats.accepted_at, default=float("nan"))
                finally:
                    sim.stop()
                if child.returncode != 0:
                    raise RuntimeError(f"exit {child.returncode}: {child.stderr}")
                rows = pq.ParquetDataset(out).read(columns=["id"]).num_rows
                if rows != n + PENDING:
                    raise RuntimeError(f"OUT holds {rows} rows, expected {n + PENDING}")
                restore(out, keep)
                s = ResumeSample(n, first - child.started, child.wall_s, child.maxrss_mb,
                                 child.cpu_s)
                samples.append(s)
                log(f"  OUT {n:>9,} done, run {rep + 1}/{repeats}: first request after "
                    f"{s.first_request_s:5.2f} s, {s.maxrss_mb:5.0f} MB peak, "
                    f"{s.wall_s:5.1f} s total", flush=True)
            for p in keep:
                p.unlink()
    return samples


# ---------------------------------------------------------------- tables


def _med(samples: list[Any], attr: str, **where: Any) -> float:
    vals = [getattr(s, attr) for s in samples
            if all(getattr(s, k) == v for k, v in where.items())]
    return statistics.median(vals) if vals else float("nan")


def memory_table(samples: list[MemSample]) -> str:
    sizes = sorted({s.manifest_rows for s in samples})
    reps = len(samples) // max(1, len(sizes))
    lines = [f"Memory at scale: same command with --limit, manifest of {sizes[0]:,} vs "
             f"{sizes[-1]:,} rows; medians of {reps} runs", "",
             "| manifest rows | rows captioned | peak RSS MB | wall s | client CPU s |",
             "|---:|---:|---:|---:|---:|"]
    for n in sizes:
        lines.append(f"| {n:,} | {_med(samples, 'captioned', manifest_rows=n):.0f} | "
                     f"{_med(samples, 'maxrss_mb', manifest_rows=n):.0f} | "
                     f"{_med(samples, 'wall_s', manifest_rows=n):.1f} | "
                     f"{_med(samples, 'cpu_s', manifest_rows=n):.1f} |")
    ratio = (_med(samples, "maxrss_mb", manifest_rows=sizes[-1])
             / _med(samples, "maxrss_mb", manifest_rows=sizes[0]))
    lines.append(f"| **ratio** | | **{ratio:.2f}x** | | |")
    return "\n".join(lines)


def resume_table(samples: list[ResumeSample]) -> str:
    sizes = sorted({s.done_rows for s in samples})
    reps = len(samples) // max(1, len(sizes))
    lines = [f"Resume at scale: OUT holding N finished rows, manifest of N + {PENDING} "
             f"(the {PENDING} pending rows last); medians of {reps} runs", "",
             "| finished rows in OUT | start to first request s | whole run s | peak RSS MB "
             "| client CPU s |",
             "|---:|---:|---:|---:|---:|"]
    for n in sizes:
        lines.append(f"| {n:,} | {_med(samples, 'first_request_s', done_rows=n):.2f} | "
                     f"{_med(samples, 'wall_s', done_rows=n):.2f} | "
                     f"{_med(samples, 'maxrss_mb', done_rows=n):.0f} | "
                     f"{_med(samples, 'cpu_s', done_rows=n):.2f} |")
    return "\n".join(lines)


def scale_targets(mem: list[MemSample], resume: list[ResumeSample]
                  ) -> list[tuple[str, bool, str]]:
    rows = []
    if mem:
        sizes = sorted({s.manifest_rows for s in mem})
        ratio = (_med(mem, "maxrss_mb", manifest_rows=sizes[-1])
                 / _med(mem, "maxrss_mb", manifest_rows=sizes[0]))
        rows.append((f"peak RSS, {sizes[-1]:,}-row manifest <= 1.5x the {sizes[0]:,}-row "
                     "figure", ratio <= 1.5, f"{ratio:.2f}x"))
    if resume:
        n = max(s.done_rows for s in resume)
        first = _med(resume, "first_request_s", done_rows=n)
        rss = _med(resume, "maxrss_mb", done_rows=n)
        rows.append((f"resume with {n:,} rows done: first request <= 5 s", first <= 5,
                     f"{first:.2f} s"))
        rows.append((f"resume with {n:,} rows done: peak RSS <= 300 MB", rss <= 300,
                     f"{rss:.0f} MB"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="large manifest / finished rows")
    p.add_argument("--small", type=int, default=1000, help="small manifest / finished rows")
    p.add_argument("--limit", type=int, default=2000, help="rows captioned in part 2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["memory", "resume"], help="run one part")
    p.add_argument("--json", type=Path, help="also write the samples here")
    args = p.parse_args(argv)
    mem: list[MemSample] = []
    resume: list[ResumeSample] = []
    if args.only != "resume":
        print(f"memory at scale: {args.small:,} vs {args.rows:,}-row manifest, "
              f"--limit {args.limit}", flush=True)
        mem = bench_memory(args.small, args.rows, args.limit, args.repeats)
    if args.only != "memory":
        print(f"resume at scale: {args.small:,} and {args.rows:,} finished rows", flush=True)
        resume = bench_resume((args.small, args.rows), args.repeats)
    for table in ([memory_table(mem)] if mem else []) + ([resume_table(resume)] if resume
                                                          else []):
        print()
        print(table)
    print()
    print(targets_table(scale_targets(mem, resume)))
    if args.json:
        args.json.write_text(json.dumps({"memory": [asdict(s) for s in mem],
                                         "resume": [asdict(s) for s in resume]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
