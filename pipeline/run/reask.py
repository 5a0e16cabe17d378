"""The quality gate on a finished row: judge it, re-ask once, apply the policy.

A caption that fails a check gets one follow-up turn on the same image, carrying the
previous answer and what was wrong with it, measured ("Your answer was 212 words;
answer in at most 60."). The row keeps whichever answer fails fewer checks (the
re-ask's on a tie), with the tokens, cost and attempts of both requests, ``reasks``
= 1 and ``reask_flags`` = what triggered it. A caption that still fails is ``ok``
with its ``quality_flags`` (policy ``flag``), or an error row of class ``quality``
that keeps its caption for inspection (policy ``error``; permanent, like a refusal).

A re-ask that cannot be sent or fails (the cost budget, a stop or a cancellation at
SIGTERM or after ``--grace``, an error row) never costs the row its first, paid
answer: the row keeps it, flagged, and says why in ``quality_notes`` (docs/protocol.md §19.5).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from ..errors import RunFatal
from ..pacing.cost import BudgetReached, CostBudget
from ..quality import Gate, Verdict
from ..quality.checks import SCAN_CHARS
from ..records import ApiRequest, ManifestRow, PreparedImage, ResultRow, Status
from ..wire.adapters import Adapter, FollowUp, RequestSpec
from .stopping import Interrupted

__all__ = ["Reasker", "judged_without_reask"]

log = logging.getLogger("pipeline")

Send = Callable[[ApiRequest], Awaitable[ResultRow]]
# Of the previous answer, the re-ask quotes at most this much: a runaway answer is not
# sent back whole (its length is in the instruction).
ANSWER_CHARS = 8_192
STOPPED = "the re-ask did not finish (the run stopped)"


class Reasker:
    def __init__(self, gate: Gate, adapter: Adapter, spec: RequestSpec,
                 budget: CostBudget | None, stopping: Callable[[], bool]) -> None:
        self.gate, self.adapter, self.spec = gate, adapter, spec
        self.budget, self.stopping = budget, stopping

    async def judged(self, row: ManifestRow, image: PreparedImage, first: ResultRow,
                     send: Send) -> ResultRow:
        """``first`` (an ok row) after the gate: as it was, or re-asked, or flagged."""
        if first.caption is None:
            return first
        verdict = await self._judge(row, first)
        if verdict.ok:
            self.gate.keep(row.prompt_name, first.caption)
            return replace(first, quality_flags=())
        second, why_not = await self._reask(row, image, first, verdict, send)
        if second is None:
            return _flagged(self.gate, first, verdict,
                            verdict.notes + (f"; {why_not}" if why_not else ""))
        return await self._choose(row, first, verdict, second)

    async def _judge(self, row: ManifestRow, r: ResultRow) -> Verdict:
        """The verdict; a caption longer than the checks read takes a thread (counting
        the words of a 16 MiB answer takes a second: the streams in flight go on)."""
        text = r.caption or ""
        if len(text) <= SCAN_CHARS and len(r.caption_json or "") <= SCAN_CHARS:
            return self.gate.judge(row.prompt_name, text, r.caption_json)
        return await asyncio.to_thread(self.gate.judge, row.prompt_name, text, r.caption_json)

    async def _reask(self, row: ManifestRow, image: PreparedImage, first: ResultRow,
                     verdict: Verdict, send: Send) -> tuple[ResultRow | None, str]:
        if not self.gate.q.reask:
            return None, ""
        answer = first.caption or ""
        if len(answer) > ANSWER_CHARS:  # the instruction says how long it was
            answer = answer[:ANSWER_CHARS] + " [...]"
        spec = replace(self.spec, follow_up=FollowUp(answer, verdict.instruction))
        req = self.adapter.build_request(row, image, spec)
        if self.budget is not None and not self.budget.affords(req.est_input_tokens,
                                                               req.est_output_tokens):
            return None, "not re-asked: --max-cost would not hold it"
        if self.stopping():
            return None, "not re-asked: the run is stopping"
        log.debug("row %s: caption failed %s; re-asking once", row.id,
                  ", ".join(verdict.names))
        try:
            second = await send(req)
        except RunFatal:
            raise
        except BudgetReached:
            return None, "not re-asked: --max-cost reached"
        except Interrupted:
            return None, STOPPED
        except asyncio.CancelledError:
            # A stop cancels a row that has no request open (its re-ask waiting for a
            # retry, the rate limit, a permit) and, after --grace, every row. The first
            # answer is paid for: hand the row back to be written, and cancel this task
            # again so that it still ends at its next wait.
            task = asyncio.current_task()
            if task is not None:
                task.cancel()
            return None, STOPPED
        except Exception as e:  # noqa: BLE001 - a bug: the first, paid answer is kept
            log.exception("row %s: the re-ask failed unexpectedly", row.id)
            return None, f"the re-ask failed: internal error {type(e).__name__}"
        return second, ""

    async def _choose(self, row: ManifestRow, first: ResultRow, verdict: Verdict,
                second: ResultRow) -> ResultRow:
        both = _sum_usage(first, second)
        extra = second.cost_usd
        if not second.ok or second.caption is None:
            kept, final = first, verdict
            note = f"{verdict.notes}; the re-ask failed ({second.error_class}: " \
                   f"{(second.error or '')[:120]})"
        else:
            again = await self._judge(row, second)
            better = len(again.flags) <= len(verdict.flags)
            kept, final = (second, again) if better else (first, verdict)
            note = "" if again.ok else f"{again.notes} (after one re-ask)" if better else \
                f"{verdict.notes}; the re-ask was no better ({again.notes})"
        self.gate.keep(row.prompt_name, kept.caption)
        merged = replace(kept, **both, reasks=1, reask_flags=verdict.names,
                         reask_cost_usd=extra, quality_flags=final.names,
                         quality_notes=note or None,
                         attempts=first.attempts + second.attempts,
                         latency_s=_add(first.latency_s, second.latency_s))
        return _policy(self.gate, merged, final)


def _flagged(gate: Gate, row: ResultRow, verdict: Verdict, note: str) -> ResultRow:
    """``row`` keeping its own caption, with the verdict's flags: counted for repeats,
    and the policy applied."""
    gate.keep(row.prompt_name, row.caption)
    return _policy(gate, replace(row, quality_flags=verdict.names,
                                 quality_notes=note or None), verdict)


def _policy(gate: Gate, row: ResultRow, verdict: Verdict) -> ResultRow:
    if verdict.ok or gate.q.policy != "error":
        return row
    return replace(row, status=Status.ERROR, error_class="quality",
                   error=f"the caption failed the quality gate: {row.quality_notes}")


def judged_without_reask(gate: Gate, row: ResultRow) -> ResultRow:
    """The gate's verdict on a row that cannot be re-asked (the batch lane: a re-ask
    would be another batch): flagged, and the policy applied."""
    if not row.ok or row.caption is None or row.dedup_of is not None:
        return row
    verdict = gate.judge(row.prompt_name, row.caption, row.caption_json)
    return _flagged(gate, row, verdict, verdict.notes)


def _add(a: float | int | None, b: float | int | None) -> float | None:
    if a is None and b is None:
        return None
    return float((a or 0) + (b or 0))


def _sum_usage(a: ResultRow, b: ResultRow) -> dict[str, Any]:
    """Tokens and cost of both requests: the row paid for both."""
    out: dict[str, Any] = {}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
                 "reasoning_tokens"):
        x, y = getattr(a, name), getattr(b, name)
        out[name] = None if x is None and y is None else (x or 0) + (y or 0)
    out["cost_usd"] = _add(a.cost_usd, b.cost_usd)
    return out
