"""What the run shows while it works and when it ends: counters, a bar or status lines.

On a TTY a tqdm bar (ok, failed, tokens, images/s, ETA against the pending rows);
otherwise (cron, CI, pipes) a plain status line every ``interval`` seconds, so logs
stay readable. Error reasons are counted with a cap so a million distinct messages
cannot grow memory.

The bar's counts are set before the bar advances, so every frame drawn shows counts
that add up to its position; a terminal that reports no width gets 80 columns.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from ..logs import json_line
from ..records import ResultRow
from ..sources.plan import PlanCounts

_MAX_REASONS = 50
_RESERVOIR = 10_000  # latency samples kept: percentiles stay exact-ish in flat memory


class Reservoir:
    """A uniform sample of at most ``size`` values (Vitter's algorithm R)."""

    def __init__(self, size: int = _RESERVOIR, rng: random.Random | None = None) -> None:
        self.size = size
        self.seen = 0
        self.values: list[float] = []
        self._rng = rng or random.Random(0)

    def add(self, v: float | None) -> None:
        if v is None:
            return
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(v)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.size:
                self.values[j] = v

    def percentiles(self) -> dict[str, float | None]:
        vals = sorted(self.values)
        if not vals:
            return {"p50": None, "p95": None, "p99": None}
        def pick(q: float) -> float:
            return round(vals[min(len(vals) - 1, int(q * len(vals)))], 4)

        return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


@dataclass
class Counters:
    ok: int = 0
    failed: int = 0
    errors_kept: int = 0     # error rows of earlier runs left as they are (permanent)
    errors_retried: int = 0  # error rows of earlier runs pending again (transient)
    plan: PlanCounts = field(default_factory=PlanCounts)  # the planner counts into it
    tokens_in: int = 0
    tokens_out: int = 0
    copies: int = 0
    cost_usd: float = 0.0
    reasked: int = 0         # rows the quality gate asked again (one follow-up turn)
    reask_cost_usd: float = 0.0
    flags: Counter[str] = field(default_factory=Counter)  # quality flags of kept captions
    error_classes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    latency: Reservoir = field(default_factory=Reservoir)
    ttft: Reservoir = field(default_factory=Reservoir)

    def record(self, row: ResultRow) -> None:
        self.cost_usd += row.cost_usd or 0.0
        if row.dedup_of:
            self.copies += 1
        elif row.attempts:
            self.latency.add(row.latency_s)
            self.ttft.add(row.ttft_s)
        if row.reasks:
            self.reasked += 1
            self.reask_cost_usd += row.reask_cost_usd or 0.0
        self.flags.update(row.quality_flags or ())
        if row.ok:
            self.ok += 1
        else:
            self.failed += 1
            self.error_classes[row.error_class or "error"] += 1
            reason = (row.error or "")[:120]
            if reason in self.reasons or len(self.reasons) < _MAX_REASONS:
                self.reasons[reason] += 1
        self.tokens_in += row.prompt_tokens or 0
        self.tokens_out += row.completion_tokens or 0

    @property
    def finished(self) -> int:
        return self.ok + self.failed

    @property
    def skipped_done(self) -> int:
        return self.plan.skipped_done

    @property
    def skipped_duplicate(self) -> int:
        return self.plan.skipped_duplicate


class RateWindow:
    """Requests and tokens over the last ``span`` seconds, in per-second buckets."""

    def __init__(self, clock: Callable[[], float], span: int = 60) -> None:
        self.clock = clock
        self.span = span
        self._buckets: deque[list[float]] = deque()  # [second, requests, tokens]

    def add(self, tokens: int) -> None:
        sec = int(self.clock())
        if not self._buckets or self._buckets[-1][0] != sec:
            self._buckets.append([sec, 0, 0])
        self._buckets[-1][1] += 1
        self._buckets[-1][2] += tokens

    def per_minute(self) -> tuple[float, float]:
        now = self.clock()
        while self._buckets and self._buckets[0][0] <= now - self.span:
            self._buckets.popleft()
        if not self._buckets:
            return 0.0, 0.0
        elapsed = max(1.0, min(self.span, now - self._buckets[0][0]))
        reqs = sum(b[1] for b in self._buckets)
        toks = sum(b[2] for b in self._buckets)
        return reqs * 60 / elapsed, toks * 60 / elapsed


def terminal_size(fp: Any) -> tuple[int, int]:
    """(columns, rows) of the terminal behind ``fp``; a sane size where it reports none
    (a serial console or a container's pty often says 0x0): $COLUMNS, else 80x24."""
    try:
        cols, rows = os.get_terminal_size(fp.fileno())
    except (AttributeError, OSError, ValueError):
        cols, rows = 0, 0
    if cols < 20:
        env = os.environ.get("COLUMNS", "")
        cols = int(env) if env.isdigit() and int(env) >= 20 else 80
    return cols, rows if rows > 0 else 24


class Progress:
    """Shows progress on stderr; ``update`` is called once per finished row."""

    def __init__(self, counters: Counters, show_bar: bool, interval: float = 30.0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 json_lines: bool = False, bar_interval: float = 0.1) -> None:
        self.json_lines = json_lines
        stream = stream or sys.stderr  # resolved per run, not at import
        self.c = counters
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.interval = interval
        self.total: int | None = None
        self.rates = RateWindow(clock)
        # What the run is waiting for, if anything (the limiter's describe_wait).
        self.waiting: Callable[[], str | None] = lambda: None
        self.bar: tqdm[Any] | None = None
        if show_bar:
            self.bar = tqdm(total=None, unit="img", file=stream, ncols=terminal_size(stream)[0],
                            smoothing=0.1, mininterval=bar_interval)
            # tqdm asks this before every frame: the width follows a resized terminal,
            # and a terminal that reports 0 columns still gets a bar.
            self.bar.dynamic_ncols = terminal_size  # type: ignore[assignment]  # tqdm accepts a callable

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, tokens: int = 0) -> None:
        """One more finished row (already in the counters)."""
        self.rates.add(tokens)
        if self.bar is not None:
            # Counts first, then the step that may draw a frame: they always agree.
            rpm, tpm = self.rates.per_minute()
            self.bar.set_postfix({"ok": self.c.ok, "failed": self.c.failed,
                                  "tok": self.c.tokens_in + self.c.tokens_out,
                                  "rpm": f"{rpm:.0f}", "tpm": f"{tpm:.0f}",
                                  **({"wait": w} if (w := self.waiting()) else {})},
                                 refresh=False)
            self.bar.update(1)

    async def status_lines(self) -> None:
        """Without a bar (cron, pipes): a status line every ``interval`` seconds, also
        while rows are slow to finish. Run as a task; cancel it at the end."""
        if self.bar is not None:
            return
        while True:
            await asyncio.sleep(self.interval)
            print(self.status_line(), file=self.stream, flush=True)

    def stats(self) -> dict[str, Any]:
        wall = max(self.clock() - self.started, 1e-9)
        rpm, tpm = self.rates.per_minute()
        return {"finished": self.c.finished, "total": self.total, "ok": self.c.ok,
                "failed": self.c.failed, "skipped_done": self.c.skipped_done,
                "tokens_in": self.c.tokens_in, "tokens_out": self.c.tokens_out,
                "cost_usd": round(self.c.cost_usd, 6), "wall_s": round(wall, 3),
                "images_per_s": round(self.c.finished / wall, 3),
                "requests_per_min": round(rpm, 1), "tokens_per_min": round(tpm, 1)}

    def status_line(self) -> str:
        waiting = self.waiting()
        if self.json_lines:
            fields = self.stats() | ({"waiting": waiting} if waiting else {})
            return json_line("progress", **fields)
        wall = max(self.clock() - self.started, 1e-9)
        total = f"/{self.total}" if self.total is not None else ""
        rpm, tpm = self.rates.per_minute()
        return (f"progress: {self.c.finished}{total} rows, ok={self.c.ok} "
                f"failed={self.c.failed}, {self.c.finished / wall:.2f} img/s, "
                f"{rpm:.0f} req/min, {tpm:.0f} tokens/min"
                + (f"; {waiting}" if waiting else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, out: str, exit_code: int | None = None, stop_reason: str | None = None,
                note: str | None = None) -> str:
        """The last line of a run (stdout): every count, and how and why it ended."""
        wall = self.clock() - self.started
        rate = self.c.finished / wall if wall > 0 else 0.0
        classes = ", ".join(f"{k}={v}" for k, v in sorted(self.c.error_classes.items()))
        parts = [
            f"ok={self.c.ok}", f"failed={self.c.failed}" + (f" ({classes})" if classes else ""),
            f"skipped={self.c.skipped_done} (already done)",
        ]
        if self.c.errors_kept or self.c.errors_retried:
            parts.append(f"earlier error rows: retried={self.c.errors_retried} "
                         f"kept={self.c.errors_kept}")
        if self.c.skipped_duplicate:
            parts.append(f"duplicate ids skipped={self.c.skipped_duplicate}")
        if self.c.copies:
            parts.append(f"copied from identical images={self.c.copies}")
        if self.c.reasked or self.c.flags:
            flags = ",".join(f"{k}={v}" for k, v in sorted(self.c.flags.items()))
            parts.append(f"quality: re-asked={self.c.reasked}"
                         + (f" (${self.c.reask_cost_usd:.4f})" if self.c.reask_cost_usd else "")
                         + (f" flagged {flags}" if flags else ""))
        parts += [f"tokens in/out={self.c.tokens_in}/{self.c.tokens_out}"]
        if self.c.cost_usd:
            parts.append(f"cost=${self.c.cost_usd:.4f}")
        parts += [f"wall={wall:.1f}s", f"{rate:.2f} img/s", f"out={out}"]
        if self.json_lines:
            return json_line("summary", "info" if not exit_code else "warning",
                             exit_code=exit_code, stop_reason=stop_reason, note=note,
                             **self.stats(), skipped_duplicate=self.c.skipped_duplicate,
                             copied_from_identical=self.c.copies, out=out,
                             errors_retried=self.c.errors_retried,
                             errors_kept=self.c.errors_kept,
                             error_classes=dict(self.c.error_classes),
                             reasked=self.c.reasked,
                             reask_cost_usd=round(self.c.reask_cost_usd, 6),
                             quality_flags=dict(self.c.flags))
        return "summary: " + " ".join(parts)
