"""The flex tier (``--service-tier flex``): a capacity 429 is not a rate limit (no pool
pause, no pacing cut, no --max-rate-wait), a row falls back to the standard tier after
``--flex-fallback-after`` refusals, and the tier served is recorded and priced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import TRANSIENT, Retryable, RunFatal, classify_http
from pipeline.images.load import ImageSource
from pipeline.images.prepare import ImagePolicy
from pipeline.pacing.cost import CostBudget, Price
from pipeline.pacing.limiter import Budgets, Limiter
from pipeline.pacing.retry import RetryPolicy
from pipeline.records import ManifestRow
from pipeline.run.worker import Worker
from pipeline.settings import FLEX_QUEUE_S, Secret, Settings
from pipeline.wire.adapters.openai_chat import OpenAIChat
from pipeline.wire.channel import ScriptedTransport
from pipeline.wire.options import RequestOptions

CAPACITY = (429, {}, [json.dumps({"error": {
    "message": "Resource unavailable: no flex capacity right now", "type":
    "resource_unavailable", "code": "resource_unavailable"}}).encode()])
ROW = ManifestRow("a", "http://img.test/a.jpg", "Describe.", 2, {})


def _sse(tier: str) -> tuple[int, dict[str, str], list[bytes]]:
    docs = [{"id": "c", "service_tier": tier, "choices": [
                {"index": 0, "delta": {"content": "Ok."}, "finish_reason": None}]},
            {"id": "c", "service_tier": tier, "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}]
    return 200, {"content-type": "text/event-stream"}, [
        *(f"data: {json.dumps(d)}\n\n".encode() for d in docs), b"data: [DONE]\n\n"]


class Clock:
    def __init__(self) -> None:
        self.t, self.sleeps, self.held = 0.0, [], []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s

    async def hold(self, s: float) -> None:
        self.held.append(s)
        self.t += s


def _settings(tmp: Path, **kw: Any) -> Settings:
    return Settings(manifest=tmp / "m.csv", out=tmp / "out", base_url="http://127.0.0.1:1/v1",
                    api_key=Secret(""), model="gpt-4o-mini",
                    options=RequestOptions(service_tier="flex"), **kw)


def _worker(tmp: Path, script: list[Any], **kw: Any) -> tuple[Worker, ScriptedTransport,
                                                             Clock, Limiter]:
    clock = Clock()
    s = _settings(tmp, **kw)
    t = ScriptedTransport(script)
    gate = Limiter(Budgets(), 4, clock=clock, sleep=clock.hold)
    policy = RetryPolicy(retries=5, base=1.0, cap=8.0, rand=lambda: 0.5)
    assert s.price is not None
    w = Worker(s, OpenAIChat(), t, ImageSource(tmp, ImagePolicy(max_bytes=1 << 20)), gate,
               policy, clock=clock, sleep=clock.sleep, budget=CostBudget(s.price, None))
    return w, t, clock, gate


def test_a_resource_unavailable_429_is_capacity_not_a_rate_limit() -> None:
    e = classify_http(*CAPACITY[:2], CAPACITY[2][0])
    assert isinstance(e, Retryable) and e.error_class == "capacity" and "capacity" in TRANSIENT


async def test_a_capacity_refusal_does_not_pause_the_pool_or_cut_the_pace(
        tmp_path: Path) -> None:
    w, _, clock, gate = _worker(tmp_path, [CAPACITY, _sse("flex")])
    row = await w.process(ROW)
    assert (row.status, row.attempts, row.service_tier) == ("ok", 2, "flex")
    assert gate.streak == 0 and clock.held == [] and clock.sleeps == [0.75]


async def test_a_row_falls_back_to_the_standard_tier_after_its_refusals(
        tmp_path: Path) -> None:
    w, t, _, _ = _worker(tmp_path, [CAPACITY, CAPACITY, _sse("default")],
                         flex_fallback_after=2)
    row = await w.process(ROW)
    tiers = [json.loads(r.body)["service_tier"] for r in t.sent]
    assert tiers == ["flex", "flex", "default"] and row.service_tier == "default"


async def test_the_tier_served_is_priced_flex_at_half(tmp_path: Path) -> None:
    flex = await _worker(tmp_path, [_sse("flex")])[0].process(ROW)
    std = await _worker(tmp_path, [_sse("default")])[0].process(ROW)
    online = Price(0.15, 0.6).cost(1000, 100)  # gpt-4o-mini's table price
    assert std.cost_usd == pytest.approx(online)
    assert flex.cost_usd == pytest.approx(online / 2)


def test_the_flex_tier_waits_for_its_queue_not_the_idle_timeout(tmp_path: Path) -> None:
    s = _settings(tmp_path, read_timeout=60.0)
    assert s.idle_timeout == FLEX_QUEUE_S and s.attempt_deadline >= FLEX_QUEUE_S
    plain = Settings(manifest=tmp_path / "m.csv", out=tmp_path / "o",
                     base_url="http://127.0.0.1:1/v1", api_key=Secret(""))
    assert plain.idle_timeout == 60.0


@pytest.mark.parametrize("kw,says", [
    ({"api": "anthropic"}, "--service-tier"), ({"lane": "batch"}, "--service-tier"),
    ({"flex_fallback_after": -1}, "--flex-fallback-after")])
def test_bad_flex_settings_exit_2(tmp_path: Path, kw: dict[str, Any], says: str) -> None:
    with pytest.raises(RunFatal) as e:
        _settings(tmp_path, **kw)
    assert e.value.exit_code == 2 and says in e.value.message


def test_an_unknown_tier_is_refused() -> None:
    with pytest.raises(RunFatal, match="--service-tier"):
        RequestOptions(service_tier="cheap")
