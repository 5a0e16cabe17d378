"""What the run shows while it works and when it ends: counters, a bar or status lines.

On a TTY a tqdm bar (ok, failed, tokens, images/s, ETA against the pending rows);
otherwise (cron, CI, pipes) a plain status line every ``interval`` seconds, so logs
stay readable. Error reasons are counted with a cap so a million distinct messages
cannot grow memory.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

_MAX_REASONS = 50


@dataclass
class Counters:
    ok: int = 0
    failed: int = 0
    skipped_done: int = 0
    skipped_duplicate: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    error_classes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)

    def record(self, row: dict[str, Any]) -> None:
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
                 stream: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic) -> None:
        self.c = counters
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.interval = interval
        self._last_line = self.started
        self.total: int | None = None
        self.rates = RateWindow(clock)
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
                                     rpm=f"{rpm:.0f}", tpm=f"{tpm:.0f}", refresh=False)
        elif self.clock() - self._last_line >= self.interval:
            self._last_line = self.clock()
            print(self.status_line(), file=self.stream, flush=True)

    def status_line(self) -> str:
        wall = max(self.clock() - self.started, 1e-9)
        total = f"/{self.total}" if self.total is not None else ""
        rpm, tpm = self.rates.per_minute()
        return (f"progress: {self.c.finished}{total} rows, ok={self.c.ok} "
                f"failed={self.c.failed}, {self.c.finished / wall:.2f} img/s, "
                f"{rpm:.0f} req/min, {tpm:.0f} tokens/min")

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
        parts += [f"tokens in/out={self.c.tokens_in}/{self.c.tokens_out}",
                  f"wall={wall:.1f}s", f"{rate:.2f} img/s", f"out={out}"]
        return "summary: " + " ".join(parts)
