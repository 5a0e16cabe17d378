"""Rows redone after a SIGKILL, and time to stop on SIGTERM, at given checkpoint settings.

A run captions a manifest against the simulator (in this process, so it can count the
requests it served); the client is killed mid-run, then rerun to completion. Rows
redone = requests served in total - rows in the manifest (no faults are injected, so
every extra request is a row captioned twice). SIGTERM: time from the signal to exit.
Each setting runs with the journal (the default) and without it (``CAPTION_JOURNAL=0``,
parts only, as before the journal), so the table compares the two in one run.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from pipeline.simulator.app import SimConfig
from pipeline.simulator.thread import SimThread


def kept(out: Path) -> int:
    """Rows a rerun does not send again: in parts, or in the journal."""
    parts = len(pd.read_parquet(out)) if any(out.glob("part-*.parquet")) else 0
    return parts + sum(len(p.read_bytes().splitlines()) for p in out.glob("_journal/*"))


def caption_cmd(manifest: Path, out: Path, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline", "caption", str(manifest), "--out", str(out),
            "--base-url", f"http://127.0.0.1:{port}/v1", "--no-progress", *extra]


def one(rows: int, kill_after: float, sig: signal.Signals, extra: list[str],
        work: Path, journal: bool) -> tuple[int, float, int, int]:
    manifest = work / f"m{time.monotonic_ns()}.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image"])
        w.writerows([f"r{i}", f"http://img.test/{i}.jpg"] for i in range(rows))
    out = work / (manifest.stem + "-out")
    sim = SimThread(SimConfig(latency=0.2, tokens_per_second=60))
    try:
        env = {**os.environ, "CAPTION_JOURNAL": "1" if journal else "0"}
        proc = subprocess.Popen(caption_cmd(manifest, out, sim.port, extra), env=env)
        time.sleep(kill_after)
        in_flight = sim.stats.in_flight
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(60)
        stop_s = time.monotonic() - t0
        committed = kept(out)
        subprocess.run(caption_cmd(manifest, out, sim.port, extra), check=True, timeout=300,
                       env=env)
        served = sim.stats.requests_total
        assert len(pd.read_parquet(out)) == rows
    finally:
        sim.stop()
    return served - rows, stop_s, committed, in_flight


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--kill-after", type=float, default=4.0)
    args = p.parse_args()
    settings = [("16", "100", "10"), ("16", "20", "2"), ("64", "100", "10")]
    print(f"\n{args.rows} rows per 16 of concurrency, simulator 0.2 s to first token, 60 tokens/s; "
          f"signal after {args.kill_after:g} s\n")
    print("| --concurrency | --flush-rows / -seconds | journal | signal | in flight at the "
          "signal | rows kept | rows redone | time to exit |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for conc, rows_k, secs in settings:
            extra = ["--concurrency", conc, "--flush-rows", rows_k, "--flush-seconds", secs]
            for journal, sig in ((True, signal.SIGKILL), (False, signal.SIGKILL),
                                 (True, signal.SIGTERM)):
                rows = args.rows * int(conc) // 16  # enough rows to still be running
                redone, stop_s, committed, in_flight = one(rows, args.kill_after, sig, extra,
                                                           Path(tmp), journal)
                print(f"| {conc} | {rows_k} / {secs} | {'on' if journal else 'off'} "
                      f"| {sig.name} | {in_flight} | {committed} | {redone} "
                      f"| {stop_s:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
