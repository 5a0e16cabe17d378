"""What the run shows while it works and when it ends: counters, a bar or status lines.

On a TTY a tqdm bar (ok, failed, tokens, images/s, ETA against the pending rows);
otherwise (cron, CI, pipes) a plain status line every ``interval`` seconds, so logs
stay readable. Error reasons are counted with a cap so a million distinct messages
cannot grow memory.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

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
        pick = lambda q: round(vals[min(len(vals) - 1, int(q * len(vals)))], 4)  # noqa: E731
        return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


@dataclass
class Counters:
    ok: int = 0
    failed: int = 0
    skipped_done: int = 0
    skipped_duplicate: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    copies: int = 0
    cost_usd: float = 0.0
    error_classes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    latency: Reservoir = field(default_factory=Reservoir)
    ttft: Reservoir = field(default_factory=Reservoir)

    def record(self, row: dict[str, Any]) -> None:
        self.cost_usd += row.get("cost_usd") or 0.0
        if row.get("dedup_of"):
            self.copies += 1
        elif row.get("attempts"):
            self.latency.add(row.get("latency_s"))
            self.ttft.add(row.get("ttft_s"))
        if row["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
            self.error_classes[row["error_class"] or "error"] += 1
            reason = (row["error"] or "")[:120]
            if reason in self.reasons or len(self.reasons) < _MAX_REASONS:
                self.reasons[reason] += 1
        self.tokens_in += row.get("prompt_tokens") or 0
        self.tokens_out += row.get("completion_tokens") or 0

    @property
    def finished(self) -> int:
        return self.ok + self.failed


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


class Progress:
    """Shows progress on stderr; ``update`` is called once per finished row."""

    def __init__(self, counters: Counters, show_bar: bool, interval: float = 30.0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 json_lines: bool = False) -> None:
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
            self.bar = tqdm(total=None, unit="img", file=stream, dynamic_ncols=True,
                            smoothing=0.1)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, tokens: int = 0) -> None:
        self.rates.add(tokens)
        if self.bar is not None:
            self.bar.update(1)
            if self.c.finished % 8 == 0 or self.c.finished == self.total:
                rpm, tpm = self.rates.per_minute()
                self.bar.set_postfix(ok=self.c.ok, failed=self.c.failed,
                                     tok=self.c.tokens_in + self.c.tokens_out,
                                     rpm=f"{rpm:.0f}", tpm=f"{tpm:.0f}",
                                     **({"wait": w} if (w := self.waiting()) else {}),
                                     refresh=False)

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
            return json.dumps({"event": "progress", **self.stats(),
                               **({"waiting": waiting} if waiting else {})})
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

    def summary(self, out: str) -> str:
        wall = self.clock() - self.started
        rate = self.c.finished / wall if wall > 0 else 0.0
        classes = ", ".join(f"{k}={v}" for k, v in sorted(self.c.error_classes.items()))
        parts = [
            f"ok={self.c.ok}", f"failed={self.c.failed}" + (f" ({classes})" if classes else ""),
            f"skipped={self.c.skipped_done} (already done)",
        ]
        if self.c.skipped_duplicate:
            parts.append(f"duplicate ids skipped={self.c.skipped_duplicate}")
        if self.c.copies:
            parts.append(f"copied from identical images={self.c.copies}")
        parts += [f"tokens in/out={self.c.tokens_in}/{self.c.tokens_out}"]
        if self.c.cost_usd:
            parts.append(f"cost=${self.c.cost_usd:.4f}")
        parts += [f"wall={wall:.1f}s", f"{rate:.2f} img/s", f"out={out}"]
        if self.json_lines:
            return json.dumps({"event": "summary", **self.stats(), "out": out,
                               "error_classes": dict(self.c.error_classes)})
        return "summary: " + " ".join(parts)
