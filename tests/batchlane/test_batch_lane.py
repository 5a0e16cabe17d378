"""The batch lane end to end against the simulator's batch APIs: the same dataset as the
online lane, files under the cap, transient failures resubmitted, cron-shaped runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST, clean, read_out

from .helpers import (
    MODEL,
    batch_argv,
    images_manifest,
    one_row_per_key,
    run_cli,
    run_subprocess,
)

pytestmark = pytest.mark.slow


def _ledger(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_batches").glob("cp*.json"))]


def _online(manifest: Path, out: Path, base_url: str, *args: str) -> int:
    return run_cli(["caption", str(manifest), "--out", str(out), "--base-url", base_url,
                    "--model", MODEL, "--concurrency", "64", *FAST, *args])


@pytest.mark.parametrize("api,rows", [("openai", 2000), ("anthropic", 300)])
def test_the_batch_lane_writes_the_online_lanes_dataset_in_files_under_the_cap(
        sim, tmp_path, api, rows):
    server = sim()
    manifest = images_manifest(tmp_path, rows)
    online, batch = tmp_path / "online", tmp_path / "batch"
    # Subprocesses: 2 000 rows would raise this process's peak RSS, which the memory
    # tests of later subprocesses inherit (ru_maxrss survives vfork + exec).
    done = run_subprocess(["caption", str(manifest), "--out", str(online), "--base-url",
                           server.base_url, "--model", MODEL, "--concurrency", "64", "--api",
                           api, *FAST])
    assert done.returncode == 0, done.stderr[-2000:]
    cap = 60_000
    done = run_subprocess(batch_argv(manifest, batch, server.base_url, "--api", api,
                                     "--batch-max-bytes", str(cap), "--wait"))
    assert done.returncode == 0, done.stderr[-2000:]
    a = read_out(online).set_index(["id", "prompt_name"]).sort_index()
    b = one_row_per_key(batch).set_index(["id", "prompt_name"]).sort_index()
    assert list(a.index) == list(b.index) and len(b) == rows
    assert (a["caption"] == b["caption"]).all()
    assert (a["prompt_tokens"] == b["prompt_tokens"]).all()
    assert set(b["lane"]) == {"batch"} and set(a["lane"]) == {"online"}
    assert b["batch_id"].notna().all()
    entries = _ledger(batch)
    assert len(entries) > 1 and all(e["bytes"] + e["requests"] + 1024 <= cap for e in entries)
    assert {e["state"] for e in entries} == {"collected"}
    assert server.creates == len(entries)
    assert not list((batch / "_batches").glob("*.jsonl"))  # request files removed


def test_a_batch_row_costs_half_the_online_row_at_the_same_token_counts(sim, tmp_path):
    server = sim()
    manifest = images_manifest(tmp_path, 20)
    online, batch = tmp_path / "online", tmp_path / "batch"
    assert _online(manifest, online, server.base_url) == 0
    assert run_cli(batch_argv(manifest, batch, server.base_url, "--wait")) == 0
    a = read_out(online).set_index("id").sort_index()
    b = read_out(batch).set_index("id").sort_index()
    assert (a["prompt_tokens"] == b["prompt_tokens"]).all()
    assert (a["completion_tokens"] == b["completion_tokens"]).all()
    for rid in a.index:
        assert clean(b.loc[rid, "cost_usd"]) == pytest.approx(clean(a.loc[rid, "cost_usd"]) / 2)


def test_batch_prices_given_override_the_half_price(sim, tmp_path):
    server = sim()
    manifest = images_manifest(tmp_path, 5)
    out = tmp_path / "out"
    assert run_cli(batch_argv(manifest, out, server.base_url, "--wait", "--batch-price-in",
                              "1", "--batch-price-out", "0")) == 0
    df = read_out(out)
    for p, c in zip(df["prompt_tokens"], df["cost_usd"]):
        assert c == pytest.approx(p / 1e6)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_expired_and_errored_requests_are_resubmitted_and_finish(sim, tmp_path, api):
    server = sim(fail_rate=0.2, expire_rate=0.2)
    manifest = images_manifest(tmp_path, 60)
    out = tmp_path / "out"
    assert run_cli(batch_argv(manifest, out, server.base_url, "--api", api, "--wait",
                              "--retries", "8")) == 0
    df = one_row_per_key(out)
    assert len(df) == 60 and (df["status"] == "ok").all()
    assert server.creates > 1  # the failed and expired ones went in later batches
    assert df["batch_id"].nunique() > 1


def test_a_run_without_wait_submits_and_exits_then_the_next_run_collects(
        sim, tmp_path, capfd):
    server = sim(delay=0.6)
    manifest = images_manifest(tmp_path, 30)
    out = tmp_path / "out"
    assert run_cli(batch_argv(manifest, out, server.base_url)) == 0
    err = capfd.readouterr().err
    assert "1 batches in flight (30 requests" in err and "run the same command again" in err
    assert read_out(out).empty and server.creates == 1
    assert run_cli(["status", str(out)]) == 0
    status = capfd.readouterr().out
    assert "batches: 1 created" in status and "30 requests" in status
    import time
    time.sleep(0.7)  # the simulated batch ends after its delay
    assert run_cli(batch_argv(manifest, out, server.base_url)) == 0
    assert "nothing in flight" in capfd.readouterr().err
    df = one_row_per_key(out)
    assert len(df) == 30 and server.creates == 1


def test_a_file_the_provider_refuses_as_too_large_is_split_not_dropped(sim, tmp_path):
    server = sim(max_bytes=40_000)  # the client believes the provider's own (200 MB)
    manifest = images_manifest(tmp_path, 200)
    out = tmp_path / "out"
    assert run_cli(batch_argv(manifest, out, server.base_url, "--wait")) == 0
    df = one_row_per_key(out)
    assert len(df) == 200 and (df["status"] == "ok").all()
    states = [e["state"] for e in _ledger(out)]
    assert states.count("split") >= 1 and states.count("collected") >= 2


def test_a_mixed_run_online_first_then_batch_is_one_dataset(sim, tmp_path, capfd):
    server = sim()
    manifest = images_manifest(tmp_path, 300)
    out = tmp_path / "out"
    assert _online(manifest, out, server.base_url, "--limit", "100") == 0
    assert run_cli(batch_argv(manifest, out, server.base_url, "--wait")) == 0
    df = one_row_per_key(out)
    assert len(df) == 300 and (df["status"] == "ok").all()
    assert (df["lane"] == "online").sum() == 100 and (df["lane"] == "batch").sum() == 200
    capfd.readouterr()
    assert run_cli(["status", str(out), "--manifest", str(manifest)]) == 0
    status = capfd.readouterr().out
    assert "300 ok, 0 failed" in status and "300 rows x 1 prompt(s), 0 pending" in status
    assert run_cli(["report", str(out)]) == 0
    assert (out / "_report.html").stat().st_size > 0


def test_dry_run_prints_the_batch_plan_and_sends_nothing(sim, tmp_path, capfd):
    server = sim()
    manifest = images_manifest(tmp_path, 50)
    out = tmp_path / "out"
    assert run_cli(batch_argv(manifest, out, server.base_url, "--dry-run",
                              "--batch-max-requests", "20")) == 0
    cap = capfd.readouterr()
    assert [ln.split(":")[0] for ln in cap.out.splitlines()] == ["file 1", "file 2", "file 3"]
    assert "batch plan: 3 files, 50 requests" in cap.err
    assert server.creates == 0 and server.state.uploads == 0 and not out.exists()


def test_cancel_stops_the_batches_in_flight_and_their_rows_are_pending_again(
        sim, tmp_path, capfd):
    server = sim(delay=30)
    manifest = images_manifest(tmp_path, 10)
    out = tmp_path / "out"
    assert run_cli(batch_argv(manifest, out, server.base_url)) == 0
    capfd.readouterr()
    assert run_cli(["cancel", str(out)]) == 0
    assert "cancelled" in capfd.readouterr().out
    server.configure(delay=0)
    assert run_cli(batch_argv(manifest, out, server.base_url, "--wait")) == 0
    df = one_row_per_key(out)
    assert len(df) == 10 and (df["status"] == "ok").all() and server.creates == 2


def test_the_batch_lane_flags_failed_captions_without_a_reask(sim, tmp_path: Path) -> None:
    server = sim()
    manifest = images_manifest(tmp_path, 3)
    out = tmp_path / "out"
    assert run_cli(batch_argv(manifest, out, server.base_url, "--wait", "--prompt",
                              "Describe the image. [soft-refuse]")) == 0
    df = one_row_per_key(out)
    assert (df["status"] == "ok").all() and (df["reasks"] == 0).all()
    assert [list(f) for f in df["quality_flags"]] == [["refusal"]] * 3
