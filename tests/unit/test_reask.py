"""The one re-ask of a caption that failed the quality gate (run/reask.py), faked at the
seam: ``send`` stands for the worker's attempts (the wire is tests/wire/test_quality_wire.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.pacing.cost import CostBudget, Price
from pipeline.quality import Gate, QualitySettings
from pipeline.records import ApiRequest, ManifestRow, PreparedImage, ResultRow, Status
from pipeline.run.reask import Reasker
from pipeline.run.stopping import Interrupted
from pipeline.wire.adapters import RequestSpec, get_adapter

ROW = ManifestRow("a", "a.png", "Describe the image.", 2, {})
IMAGE = PreparedImage("data:image/png;base64,AAAA", "image/png", 4, 64, 64)
GOOD = "A brown dog sleeps on a red couch next to a sunny window."
REFUSAL = "I'm sorry, but I can't help with that."


def ok(caption: str, tokens: int = 100, cost: float = 0.01) -> ResultRow:
    return ResultRow(id="a", status=Status.OK, caption=caption, prompt_tokens=tokens,
                     completion_tokens=10, total_tokens=tokens + 10, cost_usd=cost,
                     attempts=1, latency_s=0.5)


class Sender:
    def __init__(self, *answers: ResultRow | BaseException) -> None:
        self.answers = list(answers)
        self.sent: list[ApiRequest] = []

    async def __call__(self, req: ApiRequest) -> ResultRow:
        self.sent.append(req)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def reasker(budget: CostBudget | None = None, stopping: bool = False,
            **q: Any) -> Reasker:
    spec = RequestSpec("gpt-4o", 300)
    return Reasker(Gate(QualitySettings(**q)), get_adapter("openai"), spec, budget,
                   lambda: stopping)


async def test_a_caption_that_passes_is_kept_with_no_request() -> None:
    send = Sender()
    row = await reasker().judged(ROW, IMAGE, ok(GOOD), send)
    assert (row.caption, row.quality_flags, row.reasks, send.sent) == (GOOD, (), 0, [])


async def test_a_failed_caption_is_reasked_once_with_the_previous_answer() -> None:
    send = Sender(ok(GOOD, tokens=150, cost=0.02))
    row = await reasker().judged(ROW, IMAGE, ok(REFUSAL), send)
    assert len(send.sent) == 1
    messages = json.loads(send.sent[0].body)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == REFUSAL and "declined" in messages[2]["content"]
    assert (row.caption, row.reasks, row.reask_flags, row.quality_flags) == \
        (GOOD, 1, ("refusal",), ())
    assert (row.prompt_tokens, row.cost_usd, row.reask_cost_usd, row.attempts) == \
        (250, pytest.approx(0.03), 0.02, 2)


async def test_the_answer_that_fails_fewer_checks_is_kept() -> None:
    send = Sender(ok(REFUSAL + " Let me know if you need anything else."))
    row = await reasker(max_words=30).judged(ROW, IMAGE, ok(REFUSAL), send)
    assert row.caption == REFUSAL and row.quality_flags == ("refusal",)
    assert "no better" in (row.quality_notes or "")


async def test_a_reask_that_fails_keeps_the_first_answer_and_its_cost() -> None:
    failed = ResultRow(id="a", status=Status.ERROR, error="HTTP 500", error_class="server",
                       attempts=3, cost_usd=None)
    row = await reasker().judged(ROW, IMAGE, ok(REFUSAL), Sender(failed))
    assert (row.status, row.caption, row.quality_flags, row.attempts) == \
        (Status.OK, REFUSAL, ("refusal",), 4)
    assert "the re-ask failed (server" in (row.quality_notes or "")


async def test_a_stop_during_the_reask_keeps_the_paid_first_answer() -> None:
    row = await reasker().judged(ROW, IMAGE, ok(REFUSAL), Sender(Interrupted()))
    assert row.caption == REFUSAL and "did not finish" in (row.quality_notes or "")


async def test_no_reask_when_the_budget_could_not_hold_it() -> None:
    budget = CostBudget(Price(3.0, 15.0), max_cost=0.0001)
    send = Sender()
    row = await reasker(budget).judged(ROW, IMAGE, ok(REFUSAL), send)
    assert send.sent == [] and "--max-cost" in (row.quality_notes or "")


async def test_no_reask_while_the_run_is_stopping() -> None:
    send = Sender()
    row = await reasker(stopping=True).judged(ROW, IMAGE, ok(REFUSAL), send)
    assert send.sent == [] and row.quality_flags == ("refusal",)


async def test_policy_error_turns_a_still_failing_caption_into_a_quality_error_row() -> None:
    row = await reasker(policy="error").judged(ROW, IMAGE, ok(REFUSAL), Sender(ok(REFUSAL)))
    assert (row.status, row.error_class, row.caption) == (Status.ERROR, "quality", REFUSAL)
    assert row.error and "refusal" in row.error


async def test_policy_error_keeps_a_row_the_reask_fixed() -> None:
    row = await reasker(policy="error").judged(ROW, IMAGE, ok(REFUSAL), Sender(ok(GOOD)))
    assert row.status == Status.OK and row.caption == GOOD


async def test_a_runaway_answer_is_quoted_only_in_part_in_the_reask() -> None:
    from pipeline.run.reask import ANSWER_CHARS

    runaway = GOOD + " and more" * 100_000
    send = Sender(ok(GOOD))
    await reasker(max_words=60).judged(ROW, IMAGE, ok(runaway), send)
    quoted = json.loads(send.sent[0].body)["messages"][1]["content"]
    assert len(quoted) <= ANSWER_CHARS + 10 and quoted.startswith(GOOD)
