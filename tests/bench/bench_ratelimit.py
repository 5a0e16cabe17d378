"""`make bench-ratelimit`: how much of a server's limit each pacing mode uses, per limiter kind.

The simulator (in this process, on 127.0.0.1) enforces its limit as one of four kinds:
a token bucket, a sliding window, a fixed clock window, or a cap on requests in flight.
Rate limits are per shortened window (6 s, so a run takes seconds, not minutes), and
either request-bound (RPM) or token-bound (TPM: image requests are token-heavy). The
pipeline runs as a separate process at ``--concurrency 64`` in three modes:

* budget:   the user's budget equals the limit (``--rpm`` / ``--tpm``; for the cap in
            flight, ``--concurrency`` = the cap); the server sends Retry-After only;
* headers:  no budget; the server sends ``x-ratelimit-*`` headers and Retry-After;
* adaptive: no budget, no headers, no Retry-After: only bare 429s to go by.

For each run: the share of the limit used in the steady state (after the first window,
while rows are still waiting), against the target, and the share of requests answered
429 including the start-up. ``--virtual`` runs the same matrix on a virtual clock in
one process (for tuning only: CPU is free there, so its figures are not measurements).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if "--virtual" in sys.argv:  # before anything of pipeline: every default clock is virtual
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import virtual_time

    virtual_time.install()

from pipeline.simulator.app import SimConfig, SimStats  # noqa: E402

# Targets of issue 14: (least share of the limit used, most share of 429s), percent.
TARGETS = {"budget": (95.0, 0.5), "headers": (95.0, 1.0), "adaptive": (85.0, 5.0)}
MODES = ("budget", "headers", "adaptive")
KINDS = ("bucket", "sliding", "fixed", "concurrency")


@dataclass(frozen=True)
class Case:
    kind: str
    bound: str  # "rpm" | "tpm" | "in flight"
    mode: str


@dataclass
class Result:
    case: Case
    used_pct: float
    r429_pct: float
    requests: int
    exit: int
    wall: float

    @property
    def ok(self) -> bool:
        least, most = TARGETS[self.case.mode]
        return self.exit == 0 and self.used_pct >= least and self.r429_pct <= most


def server_config(case: Case, a: argparse.Namespace) -> SimConfig:
    common: dict[str, Any] = {
        "latency": a.latency, "tokens_per_second": 100, "seed": 1,
        "rate_limit_headers": case.mode == "headers",
        "retry_after": "none" if case.mode == "adaptive" else "auto"}
    if case.kind == "concurrency":
        return SimConfig(limiter="concurrency", max_in_flight=a.in_flight, **common)
    limit = {"rpm": a.rpm} if case.bound == "rpm" else {"tpm": a.tpm}
    return SimConfig(limiter=case.kind, window=a.window, **limit, **common)


def client_args(case: Case, a: argparse.Namespace) -> list[str]:
    per_minute = 60 / a.window
    if case.mode != "budget":
        return ["--concurrency", str(a.concurrency)]
    if case.kind == "concurrency":
        return ["--concurrency", str(a.in_flight)]
    if case.bound == "rpm":
        return ["--concurrency", str(a.concurrency), "--rpm", f"{a.rpm * per_minute:g}"]
    return ["--concurrency", str(a.concurrency), "--tpm", f"{a.tpm * per_minute:g}"]


def used_share(case: Case, st: SimStats, a: argparse.Namespace) -> float:
    """Percent of the limit used in the steady state: after the first two windows (a
    fresh limiter lets any client burst, and the client is still finding the limit),
    until the last request was admitted (while rows were still waiting)."""
    times = sorted(st.accepted_at)
    if case.kind == "concurrency":
        start = times[0] + 2 * a.window
        return 100 * mean_in_flight(st.in_flight_log, start, times[-1]) / a.in_flight
    steady = [t for t in times if t >= times[0] + 2 * a.window]
    if len(steady) < 10:
        return float("nan")
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    if case.bound == "rpm":
        return 100 * rate / (a.rpm / a.window)
    return 100 * rate * (st.tokens_served / len(times)) / (a.tpm / a.window)


def mean_in_flight(log: list[tuple[float, int]], start: float, end: float) -> float:
    total, last_t, last_n = 0.0, start, 0
    for t, n in sorted(log):
        if t > end:
            break
        if t > start:
            total += last_n * (t - last_t)
            last_t = t
        last_n = n
    total += last_n * (end - last_t)
    return total / max(1e-9, end - start)


def caption_argv(case: Case, a: argparse.Namespace, port: int, manifest: Path,
                 out: Path) -> list[str]:
    return ["caption", str(manifest), "--out", str(out), "--base-url",
            f"http://127.0.0.1:{port}/v1", "--no-progress", "--max-tokens", "100",
            "--status-interval", "3600", *client_args(case, a)]


def run_real(case: Case, a: argparse.Namespace, manifest: Path, out: Path
             ) -> tuple[int, SimStats, float]:
    from pipeline.simulator.thread import SimThread

    sim = SimThread(server_config(case, a))
    try:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pipeline",
                               *caption_argv(case, a, sim.port, manifest, out)],
                              capture_output=True, text=True, timeout=a.timeout)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
    finally:
        sim.stop()
    return proc.returncode, sim.stats, wall


def run_virtual(case: Case, a: argparse.Namespace, manifest: Path, out: Path
                ) -> tuple[int, SimStats, float]:
    import logging

    from pipeline.commands.caption import build_parser, settings_from_args
    from pipeline.engines import get_engine
    from pipeline.run.session import RunSession
    from pipeline.simulator.app import STATS, start

    logging.getLogger("pipeline").setLevel(logging.ERROR)

    async def both() -> tuple[int, SimStats, float]:
        runner, port = await start(server_config(case, a))
        try:
            t0 = time.monotonic()
            ns = build_parser().parse_args(caption_argv(case, a, port, manifest, out)[1:])
            settings = settings_from_args(ns)
            result = await RunSession(settings, get_engine(settings.engine)).execute()
            return result.exit_code, runner.app[STATS], time.monotonic() - t0
        finally:
            await runner.cleanup()

    loop = virtual_time.new_loop()
    try:
        return loop.run_until_complete(both())
    finally:
        loop.close()


def run_case(case: Case, a: argparse.Namespace, work: Path, manifest: Path) -> Result:
    out = work / f"{case.kind}-{case.bound}-{case.mode}".replace(" ", "_")
    code, st, wall = (run_virtual if a.virtual else run_real)(case, a, manifest, out)
    return Result(case, used_share(case, st, a),
                  100 * st.requests_429 / max(1, st.requests_total), st.requests_total,
                  code, wall)


def cases(a: argparse.Namespace) -> list[Case]:
    out = []
    for kind in a.kinds.split(","):
        bounds = ["in flight"] if kind == "concurrency" else a.bounds.split(",")
        out += [Case(kind, bound, mode) for bound in bounds for mode in a.modes.split(",")]
    return out


def print_table(rows: list[Result], a: argparse.Namespace) -> None:
    print(f"\n{a.images} images per run, client --concurrency {a.concurrency} (budget mode "
          f"for the cap: --concurrency {a.in_flight}); server latency {a.latency} s, "
          f"limits per {a.window:g} s: {a.rpm} requests (rpm-bound) or {a.tpm} tokens "
          f"(tpm-bound), or {a.in_flight} in flight" + (" [VIRTUAL CLOCK]" if a.virtual else ""))
    print("targets: budget >= 95 % used, <= 0.5 % 429s; headers >= 95 %, <= 1 %; "
          "adaptive >= 85 %, <= 5 %\n")
    print("| limiter | bound | mode | % of limit used | % 429 | requests | exit | wall s "
          "| target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r.case
        print(f"| {c.kind} | {c.bound} | {c.mode} | {r.used_pct:.1f} | {r.r429_pct:.2f} | "
              f"{r.requests} | {r.exit} | {r.wall:.1f} | {'met' if r.ok else 'MISSED'} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rpm", type=int, default=60, help="server requests per window")
    p.add_argument("--tpm", type=int, default=66_000, help="server tokens per window")
    p.add_argument("--in-flight", type=int, default=4, help="server cap on requests in flight")
    p.add_argument("--window", type=float, default=6.0, help="server window, seconds")
    p.add_argument("--latency", type=float, default=0.2, help="server time to first token")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--bounds", default="rpm,tpm")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--virtual", action="store_true", help="virtual clock (tuning only)")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = work / "bench.csv"
        with manifest.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "image"])
            for i in range(a.images):
                w.writerow([f"r{i}", f"http://img.test/{i}.jpg"])
        for case in cases(a):
            rows.append(run_case(case, a, work, manifest))
            r = rows[-1]
            print(f"{case.kind:<12} {case.bound:<9} {case.mode:<9} used {r.used_pct:5.1f} % "
                  f"429 {r.r429_pct:5.2f} % requests {r.requests} exit {r.exit} "
                  f"wall {r.wall:.1f} s", file=sys.stderr, flush=True)
    print_table(rows, a)
    return 0 if all(r.exit == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
