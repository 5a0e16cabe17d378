"""`make bench-ratelimit`: how close to the server's limit each pacing mode runs.

The simulator (in this process, on 127.0.0.1) enforces RPM and TPM per shortened
window; the pipeline runs as a separate process against it, in three modes:
(a) budgets equal to the server's limits, (b) no budget (learns from the
x-ratelimit-* headers), (c) no budget and no headers (adaptive, from 429s).
Prints achieved RPM/TPM as % of the limit and the share of requests answered 429.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.simulator.thread import SimThread
from pipeline.simulator.app import SimConfig


def run_mode(name: str, args: argparse.Namespace, client_args: list[str], headers: bool,
             manifest: Path, work: Path) -> dict[str, float | str]:
    sim = SimThread(SimConfig(latency=0.05, tokens_per_second=100, rpm=args.rpm, tpm=args.tpm,
                              window=args.window, rate_limit_headers=headers))
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "caption", str(manifest), "--out",
             str(work / name), "--base-url", f"http://127.0.0.1:{sim.port}/v1",
             "--no-progress", "--concurrency", "32", "--max-tokens", "100",
             "--backoff-base", "0.2", *client_args],
            capture_output=True, text=True, timeout=args.timeout)
        wall = time.monotonic() - t0
        st = sim.stats
        times = sorted(st.accepted_at)
        if args.trace:
            t0s = min(times[0], *(st.rejected_at or [times[0]]))
            hist = {}
            for t in st.rejected_at:
                hist[int(t - t0s)] = hist.get(int(t - t0s), 0) + 1
            acc = {}
            for t in times:
                acc[int(t - t0s)] = acc.get(int(t - t0s), 0) + 1
            seconds = range(int(times[-1] - t0s) + 1)
            print(name, "per second accepted/429:",
                  " ".join(f"{s}:{acc.get(s, 0)}/{hist.get(s, 0)}" for s in seconds))
    finally:
        sim.stop()
    # Steady state: skip the first window, in which the server's full bucket lets
    # any client burst above the rate; then accepted requests per second vs the limit.
    steady = [t for t in times if t >= times[0] + args.window]
    span = steady[-1] - steady[0] if len(steady) > 1 else float("nan")
    rpm_pct = 100 * (len(steady) - 1) / span / (args.rpm / args.window)
    tokens_rate = st.tokens_served / (times[-1] - times[0])
    return {"mode": name, "rows": len(times), "exit": proc.returncode, "wall_s": wall,
            "rpm_pct": rpm_pct, "tpm_pct": 100 * tokens_rate / (args.tpm / args.window),
            "r429_pct": 100 * st.requests_429 / max(1, st.requests_total),
            "requests": st.requests_total}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rpm", type=int, default=60, help="server requests per window")
    p.add_argument("--tpm", type=int, default=90_000, help="server tokens per window")
    p.add_argument("--window", type=float, default=6.0, help="server window, seconds")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--modes", default="abc", help="which modes to run (default abc)")
    p.add_argument("--trace", action="store_true", help="print accepted/429 per second")
    args = p.parse_args()
    per_min = 60 / args.window
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = work / "bench.csv"
        with manifest.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "image"])
            for i in range(args.images):
                w.writerow([f"r{i}", f"http://img.test/{i}.jpg"])
        modes = [
            ("a) budgets = limits", ["--rpm", str(args.rpm * per_min),
                                     "--tpm", str(args.tpm * per_min)], True),
            ("b) headers only", [], True),
            ("c) adaptive, no headers", [], False),
        ]
        rows = [run_mode(n, args, a, h, manifest, work) for n, a, h in modes
                if n[0] in args.modes]
    print(f"\nserver limits: {args.rpm} requests and {args.tpm} tokens per {args.window:g} s "
          f"window; {args.images} images; client --concurrency 32\n")
    print(f"| {'mode':<26} | RPM % of limit | TPM % of limit | 429 % | requests | wall s |")
    print(f"|{'-' * 28}|----------------|----------------|-------|----------|--------|")
    for r in rows:
        print(f"| {r['mode']:<26} | {r['rpm_pct']:>14.1f} | {r['tpm_pct']:>14.1f} | "
              f"{r['r429_pct']:>5.1f} | {r['requests']:>8} | {r['wall_s']:>6.1f} |")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
