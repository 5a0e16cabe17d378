"""The flex tier against the simulator on 127.0.0.1: a share of flex requests refused
"429 Resource Unavailable"; every row ends ok, records the tier it was served on, and
costs the flex (half) or the standard price accordingly."""

from __future__ import annotations

import pytest
from batchlane.helpers import images_manifest, run_cli
from conftest import FAST, read_out

from pipeline.simulator.app import SimConfig
from pipeline.simulator.flex import FLEX_REFUSED
from pipeline.simulator.thread import SimThread


def test_flex_rows_record_and_price_the_tier_they_were_served_on(tmp_path) -> None:
    sim = SimThread(SimConfig(latency=0, tokens_per_second=0, flex_unavailable_rate=0.5))
    try:
        manifest = images_manifest(tmp_path, 40)
        out = tmp_path / "out"
        assert run_cli(["caption", str(manifest), "--out", str(out), "--base-url",
                        sim.base_url, "--model", "gpt-4o-mini", "--service-tier", "flex",
                        "--retries", "6", "--flex-fallback-after", "2", *FAST]) == 0
        refused = len(sim.runner.app[FLEX_REFUSED])
    finally:
        sim.stop()
    df = read_out(out)
    assert len(df) == 40 and (df["status"] == "ok").all() and refused > 0
    assert set(df["service_tier"]) == {"flex", "default"}
    for tier, share in (("flex", 0.5), ("default", 1.0)):
        rows = df[df["service_tier"] == tier]
        expected = (rows["prompt_tokens"] * 0.15 + rows["completion_tokens"] * 0.6) / 1e6
        assert list(rows["cost_usd"]) == pytest.approx(list(expected * share))
    assert (df[df["service_tier"] == "default"]["attempts"] >= 3).all()  # fell back
