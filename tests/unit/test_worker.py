"""Worker logic with a fake transport at the seam: retries, discarding, pausing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import Retryable, RunFatal
from pipeline.images.load import ImageSource
from pipeline.images.prepare import ImagePolicy
from pipeline.pacing.cost import BudgetReached, CostBudget, Price
from pipeline.pacing.limiter import Budgets, Limiter
from pipeline.pacing.retry import RetryPolicy
from pipeline.records import ManifestRow
from pipeline.run.worker import Worker
from pipeline.settings import Secret, Settings
from pipeline.wire.adapters.openai_chat import OpenAIChat
from pipeline.wire.channel import ScriptedTransport


def sse(*docs: Any, done: bool = True) -> list[bytes]:
    out = [f"data: {json.dumps(d)}\n\n".encode() for d in docs]
    return out + ([b"data: [DONE]\n\n"] if done else [])


def text(t: str) -> dict[str, Any]:
    return {"id": "c", "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}


STOP = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}


KEY = "sk-worker-test-key"


class Clock:
    """Fake time: ``sleeps`` are the row's own waits, ``held`` the limiter's (the pool)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []
        self.held: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s

    async def hold(self, s: float) -> None:
        self.held.append(s)
        self.t += s


def make(script: list[Any], tmp_path: Path, retries: int = 3, max_rate_wait: float = 1800.0,
         budget: CostBudget | None = None) -> tuple[Worker, ScriptedTransport, Clock, Limiter]:
    clock = Clock()
    settings = Settings(manifest=tmp_path / "m.csv", out=tmp_path / "out",
                        base_url="http://127.0.0.1:1/v1", api_key=Secret(KEY))
    transport = ScriptedTransport(script)
    gate = Limiter(Budgets(), 4, clock=clock, sleep=clock.hold)
    policy = RetryPolicy(retries=retries, base=1.0, cap=8.0, max_rate_wait=max_rate_wait,
                         rand=lambda: 0.5)
    w = Worker(settings, OpenAIChat(), transport,
               ImageSource(tmp_path, ImagePolicy(max_bytes=1 << 20)), gate, policy,
               clock=clock, sleep=clock.sleep, budget=budget)
    return w, transport, clock, gate


OK = (200, {"content-type": "text/event-stream"}, sse(text("Ok."), STOP))
REFUSED = (429, {}, [b'{"error":{"message":"Rate limit reached"}}'])


ROW = ManifestRow("a", "http://img.test/a.jpg", None, 2, {})


async def test_partial_text_of_a_cut_stream_is_discarded_on_retry(tmp_path: Path) -> None:
    w, t, clock, _ = make([
        (200, {"content-type": "text/event-stream"},
         [*sse(text("Half a cap"), done=False), Retryable("reset", "connection")]),
        (200, {"content-type": "text/event-stream"}, sse(text("Whole."), STOP)),
    ], tmp_path)
    row = await w.process(ROW)
    assert (row.status, row.caption, row.attempts) == ("ok", "Whole.", 2)
    assert clock.sleeps == [0.75]  # step 1 waits within [0.5, 1] x base: rand 0.5


async def test_backoff_grows_step_by_step_and_gives_up_with_the_last_class(
        tmp_path: Path) -> None:
    w, _, clock, _ = make([(503, {}, [b"busy"])] * 4, tmp_path, retries=3)
    row = await w.process(ROW)
    assert (row.status, row.error_class, row.attempts) == ("error", "server", 4)
    assert "gave up after 4 attempts" in row.error
    assert clock.sleeps == [0.75, 1.5, 3.0]


async def test_429_retry_after_pauses_the_whole_pool(tmp_path: Path) -> None:
    w, _, clock, gate = make([
        (429, {"retry-after": "7"}, [b'{"error":{"message":"slow down"}}']),
        (200, {"content-type": "text/event-stream"}, sse(text("Ok."), STOP)),
    ], tmp_path)
    row = await w.process(ROW)
    assert (row.status, row.attempts, row.retry_after_s) == ("ok", 2, 7.0)
    assert gate.gate.pauses == 1 and clock.sleeps == [7.0]


async def test_a_permanent_error_is_not_retried(tmp_path: Path) -> None:
    w, t, _, _ = make([(400, {}, [b'{"error":{"message":"Invalid image."}}'])], tmp_path)
    row = await w.process(ROW)
    assert (row.status, row.error_class, row.attempts) == ("error", "bad_image", 1)
    assert len(t.sent) == 1


async def test_a_401_raises_run_fatal_after_one_request_instead_of_a_row(
        tmp_path: Path) -> None:
    """The seam's half of "a wrong key is fatal"; the wire's half is
    tests/wire/test_conformance.py::test_c35_auth_and_model_errors_stop_the_run_with_one_line."""
    w, t, _, _ = make([(401, {}, [b'{"error":{"message":"Incorrect API key provided",'
                                  b'"code":"invalid_api_key"}}'])], tmp_path)
    with pytest.raises(RunFatal) as info:
        await w.process(ROW)
    assert info.value.error_class == "auth" and len(t.sent) == 1
    assert "Incorrect API key provided" in info.value.message
    assert KEY not in info.value.message


async def test_manifest_row_error_becomes_a_bad_input_row_without_a_request(
        tmp_path: Path) -> None:
    w, t, _, _ = make([], tmp_path)
    bad = ManifestRow("line-3", "", None, 3, {}, error="manifest line 3: empty image cell")
    row = await w.process(bad)
    assert (row.status, row.error_class, row.line) == ("error", "bad_input", 3)
    assert t.sent == []


async def test_json_error_with_status_200_is_retried(tmp_path: Path) -> None:
    w, _, _, _ = make([
        (200, {"content-type": "application/json"},
         [b'{"error":{"message":"upstream failed","type":"server_error"}}']),
        (200, {"content-type": "text/event-stream"}, sse(text("Fine."), STOP)),
    ], tmp_path)
    row = await w.process(ROW)
    assert (row.status, row.caption, row.attempts) == ("ok", "Fine.", 2)


async def test_a_chunk_of_an_impossible_shape_fails_its_row_for_good(tmp_path: Path) -> None:
    odd = {"id": "c", "choices": [None]}  # valid JSON, no protocol allows it
    w, _, _, _ = make([
        (200, {"content-type": "text/event-stream"}, sse(text("Half"), odd)),
        (200, {"content-type": "text/event-stream"}, sse(text("Whole."), STOP)),
    ], tmp_path)
    row = await w.process(ROW)  # permanent: a rerun does not pay for it again either
    assert (row.status, row.error_class, row.attempts) == ("error", "bad_response", 1)


async def test_an_unexpected_bug_fails_the_row_not_the_batch(tmp_path: Path) -> None:
    w, _, _, _ = make([], tmp_path)

    def broken(*args: object) -> None:
        raise ZeroDivisionError("a bug")

    w.adapter.build_request = broken  # type: ignore[method-assign]
    row = await w.process(ROW)
    assert (row.status, row.error_class) == ("error", "internal")
    assert "ZeroDivisionError" in row.error


# --------------------------------------------------------------------------- the rate limit


async def test_429s_do_not_use_up_the_retries(tmp_path: Path) -> None:
    w, t, _, _ = make([REFUSED] * 6 + [OK], tmp_path, retries=1)
    row = await w.process(ROW)
    assert (row.status, row.attempts) == ("ok", 7)
    assert len(t.sent) == 7


async def test_529s_do_not_use_up_the_retries_either(tmp_path: Path) -> None:
    overloaded = (529, {}, [b'{"type":"error","error":{"type":"overloaded_error"}}'])
    w, _, _, _ = make([overloaded] * 4 + [OK], tmp_path, retries=0)
    row = await w.process(ROW)
    assert (row.status, row.attempts) == ("ok", 5)


async def test_waiting_for_the_rate_limit_is_bounded_per_row(tmp_path: Path) -> None:
    slow = (429, {"retry-after": "100"}, [b'{"error":{"message":"slow down"}}'])
    w, t, clock, _ = make([slow] * 5, tmp_path, max_rate_wait=250.0)
    row = await w.process(ROW)
    # 100 s, then 100 s more (200 in all); a third wait would pass 250: give up.
    assert (row.status, row.error_class, row.attempts) == ("error", "rate_limit", 3)
    assert "--max-rate-wait 250" in row.error and "200 s waiting" in row.error
    assert len(t.sent) == 3
    assert clock.t == pytest.approx(200.0)


@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "soon", "nan", "inf", ""])
async def test_retry_after_that_gives_no_guidance_means_the_backoff(
        tmp_path: Path, value: str) -> None:
    refused = (429, {"retry-after": value}, [b'{"error":{"message":"slow down"}}'])
    w, _, clock, _ = make([refused, refused, OK], tmp_path)
    row = await w.process(ROW)
    assert row.status == "ok"
    assert clock.sleeps[:2] == [0.75, 1.5]  # never a zero-delay repetition
    assert row.retry_after_s is None  # the server gave no usable wait


async def test_a_rows_rate_limit_waits_grow_from_step_to_step(tmp_path: Path) -> None:
    w, _, clock, _ = make([REFUSED] * 4 + [OK], tmp_path)
    await w.process(ROW)
    assert clock.sleeps == [0.75, 1.5, 3.0, 6.0]


async def test_cost_is_reserved_only_once_the_rate_permit_is_granted(tmp_path: Path) -> None:
    budget = CostBudget(Price(1.0, 1.0), max_cost=10.0)
    w, _, _, limiter = make([OK], tmp_path, budget=budget)
    seen: list[float] = []
    acquire = limiter.acquire

    async def watched(est_in: int, est_out: int) -> Any:
        seen.append(budget.reserved)  # what the budget holds while the row waits
        return await acquire(est_in, est_out)

    limiter.acquire = watched  # type: ignore[method-assign]
    row = await w.process(ROW)
    assert row.status == "ok" and seen == [0.0]
    assert budget.reserved == 0.0  # settled


async def test_a_budget_stop_after_the_permit_gives_the_permit_back(tmp_path: Path) -> None:
    budget = CostBudget(Price(1.0, 1.0), max_cost=10.0)
    w, t, _, limiter = make([OK], tmp_path, budget=budget)
    budget.reserved = 9.9999  # another request in flight holds nearly all of it
    with pytest.raises(BudgetReached):
        await w.process(ROW)
    assert t.sent == [] and limiter.slots.in_flight == 0


async def test_a_budget_that_cannot_pay_one_row_stops_before_waiting(tmp_path: Path) -> None:
    budget = CostBudget(Price(1e6, 1e6), max_cost=0.01)  # a row costs far more
    w, t, _, limiter = make([OK], tmp_path, budget=budget)
    with pytest.raises(BudgetReached):
        await w.process(ROW)
    assert t.sent == [] and limiter.slots.in_flight == 0



async def test_the_pool_pause_after_two_cuts_of_a_measured_pace_is_the_shortest_step(
        tmp_path: Path) -> None:
    w, _, clock, gate = make([REFUSED] * 3 + [OK], tmp_path)
    gate.slots.slow_start = False
    a = gate.adaptive
    for n in range(30):  # a first cycle of the rate found from 429s has ended
        clock.t += 0.1
        a.on_sent()
        if n == 20:
            a.on_throttle(clock.t, 1, ramp=20.0)
        else:
            a.on_success(clock.t)
    assert a.bucket is not None
    gate.buckets["rpm"] = a.bucket
    row = await w.process(ROW)
    assert row.status == "ok"
    # Two refusals cut the pace; the third pauses the pool for step 1 of the schedule
    # (base 1 s, jitter 0.75-1: rand 0.5), not step 3 (2.25 s times that).
    assert gate.gate.pauses == 1
    assert gate.gate.until - gate.gate.started == pytest.approx(0.875)
