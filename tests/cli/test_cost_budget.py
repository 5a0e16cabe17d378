"""A tight ``--max-cost`` never turns into lost rows: a budget of about three rows' cost at
``--concurrency 16`` captions at least one row per run, stops with exit 5, and a sequence
of reruns completes the manifest. ``--dry-run`` warns when the budget is below what the
rows in flight at ``--concurrency`` would reserve. Against the simulator on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import read_out, write_manifest

from pipeline.simulator.app import SimConfig
from pipeline.simulator.thread import SimThread

ROWS = 12
PRICES = ["--price-in", "3", "--price-out", "15"]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimThread]:
    s = SimThread(SimConfig(latency=0.05, tokens_per_second=0))
    try:
        yield s
    finally:
        s.stop()


def caption(capfd: pytest.CaptureFixture[str], manifest: Path, out: Path, sim: SimThread,
            *args: str) -> tuple[int, str, str]:
    from pipeline.cli import main

    capfd.readouterr()
    code = main(["caption", str(manifest), "--out", str(out), "--base-url", sim.base_url,
                 "--no-progress", "--concurrency", "16", *PRICES, *args])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def one_rows_cost(capfd: pytest.CaptureFixture[str], manifest: Path, out: Path,
                  sim: SimThread) -> float:
    code, stdout, _ = caption(capfd, manifest, out, sim, "--dry-run")
    assert code == 0
    costs = [float(line.split("\t")[6]) for line in stdout.splitlines()[1:]]
    assert len(costs) == ROWS and len(set(costs)) == 1
    return costs[0]


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path / "m.csv", [
        {"id": f"r{i:02d}", "image": f"http://img.test/{i}.jpg"} for i in range(ROWS)])


def test_a_budget_of_three_rows_captions_every_run_and_reruns_complete(
        tmp_path: Path, manifest: Path, sim: SimThread,
        capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    budget = 3 * one_rows_cost(capfd, manifest, out, sim)
    done = []
    for _ in range(ROWS):  # at least one row per run: ROWS runs at most
        code, _, err = caption(capfd, manifest, out, sim, "--max-cost", f"{budget:.6f}")
        now = len(read_out(out))
        done.append(now)
        assert code in (0, 5), err
        if code == 0:
            break
        assert "cost budget reached" in err
        assert now > (done[-2] if len(done) > 1 else 0), f"a run captioned nothing: {done}"
    df = read_out(out)
    assert len(df) == ROWS and set(df["status"]) == {"ok"}
    assert len(done) >= 2  # the budget did stop runs: this was not one unlimited run
    # Every run spent within its budget: what it captioned, at the estimate, fits.
    assert df["cost_usd"].max() <= budget / 3


def test_dry_run_warns_when_the_budget_is_below_what_the_rows_in_flight_reserve(
        tmp_path: Path, manifest: Path, sim: SimThread,
        capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    row = one_rows_cost(capfd, manifest, out, sim)
    code, _, err = caption(capfd, manifest, out, sim, "--dry-run", "--max-cost", f"{3 * row:.6f}")
    assert code == 0
    (warning,) = [ln for ln in err.splitlines() if ln.startswith("warning: --max-cost")]
    assert "--concurrency 16" in warning and "at most 3 rows in flight at once" in warning
    code, _, err = caption(capfd, manifest, out, sim, "--dry-run", "--max-cost",
                           f"{20 * row:.6f}")
    assert code == 0 and "warning: --max-cost" not in err  # 12 rows fit: no warning
    code, _, err = caption(capfd, manifest, out, sim, "--dry-run", "--max-cost",
                           f"{row / 2:.6f}")
    assert "no row at all" in err


def test_a_budget_stop_among_reasks_loses_no_paid_request_and_reruns_complete(
        tmp_path: Path, manifest: Path, sim: SimThread,
        capfd: pytest.CaptureFixture[str]) -> None:
    # Every first answer is a refusal: the re-asks and the next rows' first requests
    # compete for a budget of under two requests, so each stop finds rows waiting to
    # re-ask and rows in flight at once.
    out = tmp_path / "out"
    budget = 1.9 * one_rows_cost(capfd, manifest, out, sim)
    served = sim.stats.requests_total
    done = [0]
    for _ in range(ROWS):
        code, _, err = caption(capfd, manifest, out, sim, "--max-cost", f"{budget:.6f}",
                               "--prompt", "Describe the image. [soft-refuse]")
        assert code in (0, 5), err
        done.append(len(read_out(out)))
        if code == 0:
            break
        assert done[-1] > done[-2], f"a run captioned nothing: {done}"
    df = read_out(out)
    assert len(df) == ROWS and df["id"].nunique() == ROWS and set(df["status"]) == {"ok"}
    # Each request the simulator answered is one of a written row's attempts.
    assert int(df["attempts"].sum()) == sim.stats.requests_total - served
