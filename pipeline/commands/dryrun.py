"""`--dry-run`: read the manifest and the images, show what would be sent and what it costs.

Nothing is sent and nothing is written, so no endpoint is needed: each pending row is
planned exactly as a real run would plan it (prompts rendered, images prepared,
request built), and its token estimate and cost are printed, with totals at the end.
A row whose image, prompt, system message and model repeat one already planned (or
one OUT holds) would be copied, not sent: it is listed as such and left out of the
estimate, the way the run's dedupe would leave it out of the bill.
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from typing import Any, TextIO

from ..errors import RowFailed
from ..images.dedupe import RECENT_MAX, ImageIndex, dedup_key
from ..images.load import ImageSource, ReadLimits, default_executor
from ..images.prepare import ImagePolicy
from ..logs import json_line
from ..records import ManifestRow, PreparedImage
from ..run.progress import Counters
from ..settings import Settings
from ..sources.manifest import Manifest
from ..sources.manifest_format import base_dir
from ..sources.plan import Plan
from ..store.checkpoint import Checkpoint, KeySet
from ..wire.adapters import get_adapter

_COLUMNS = ("id", "prompt_name", "image", "sent", "est_input_tokens", "max_output_tokens",
            "est_cost_usd")


class _Seen:
    """Dedup keys planned so far: bounded like the run's own table of recent results."""

    def __init__(self, index: ImageIndex | None) -> None:
        self.index = index
        self.recent: OrderedDict[str, None] = OrderedDict()

    def copied(self, key: str) -> bool:
        if key in self.recent:
            return True
        if self.index is not None and self.index.lookup(key) is not None:
            return True
        self.recent[key] = None
        if len(self.recent) > RECENT_MAX:
            self.recent.popitem(last=False)
        return False


class _Table:
    """The per-row listing: tab-separated text, or one JSON object a row."""

    def __init__(self, stream: TextIO, json_lines: bool) -> None:
        self.stream, self.json_lines = stream, json_lines
        if not json_lines:
            print("\t".join(_COLUMNS), file=stream)

    def row(self, row: ManifestRow, sent: str, *values: Any) -> None:
        cells = (row.id, row.prompt_name, row.image, sent, *values)
        if self.json_lines:
            print(json_line("dry_run_row", **dict(zip(_COLUMNS, cells))), file=self.stream)
        else:
            print("\t".join("" if v is None else str(v) for v in cells), file=self.stream)


async def dry_run(s: Settings, stream: TextIO | None = None) -> int:
    stream = stream or sys.stdout
    json_lines = s.log_format == "json"
    manifest = Manifest(s.manifest, s.manifest_format)
    # Read-only: a dry run may sit beside a running job, so it neither locks nor repairs.
    exists = s.out.exists()
    scan = await asyncio.to_thread(Checkpoint(s.out).scan) if exists else None
    done = scan.done(s.retry_errors) if scan is not None else KeySet()
    index = await asyncio.to_thread(ImageIndex, scan.parts) \
        if scan is not None and s.dedupe else None
    seen = _Seen(index if index is not None and len(index) else None)
    adapter = get_adapter(s.api)
    price = s.price
    executor = default_executor()
    images = ImageSource(base_dir(s.manifest), ImagePolicy(s.max_edge, s.max_image_bytes),
                         executor, limits=ReadLimits(s.max_file_bytes, s.image_timeout))
    counters = Counters()
    plan = Plan(manifest, done, s.named_prompts, s.limit, counters.plan)
    table = _Table(stream, json_lines)
    total_in = total_out = bad = copied = costed = 0
    total_cost = 0.0
    try:
        for group in plan:
            for row in group:
                try:
                    if row.error:
                        raise RowFailed(row.error, "bad_input")
                    image = await images.load(row)
                except RowFailed as e:
                    bad += 1
                    table.row(row, f"error: {e.message}")
                    continue
                if s.dedupe and image.sha256 is not None and seen.copied(
                        dedup_key(image.sha256, row.prompt or s.prompt, s.system, s.model)):
                    copied += 1
                    table.row(row, "copy (identical image)", 0, 0, 0 if price else None)
                    continue
                req = adapter.build_request(row, image, s.request_spec)
                cost = price.cost(req.est_input_tokens, req.est_output_tokens) if price else None
                costed += 1
                total_in += req.est_input_tokens
                total_out += req.est_output_tokens
                total_cost += cost or 0.0
                table.row(row, _sent(image), req.est_input_tokens, req.est_output_tokens,
                          None if cost is None else round(cost, 6))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        manifest.close()
    _totals(plan.pending, bad, copied, counters.skipped_done, total_in, total_out,
            total_cost if price else None, json_lines)
    if s.max_cost is not None and price is not None and costed:
        _warn_budget(s, total_cost / costed, costed)
    return 0


def _warn_budget(s: Settings, per_row: float, rows: int) -> None:
    """Each request in flight holds its estimate of the budget: say when the budget is
    smaller than what ``--concurrency`` of them would hold."""
    in_flight = min(s.concurrency, rows)
    if s.max_cost is None or s.max_cost >= per_row * in_flight:
        return
    fits = int(s.max_cost // per_row) if per_row > 0 else in_flight
    what = (f"at most {fits} rows in flight at once" if fits else
            "no row at all: nothing would be captioned")
    print(f"warning: --max-cost ${s.max_cost:.4f} is below what --concurrency {s.concurrency} "
          f"rows in flight would reserve (${per_row * in_flight:.4f}, ${per_row:.6f} a row on "
          f"average): it affords {what}", file=sys.stderr)


def _sent(image: PreparedImage) -> str:
    return f"{image.width}x{image.height}" if image.width else "url"


def _totals(pending: int, bad: int, copied: int, skipped: int, tokens_in: int,
            tokens_out: int, cost: float | None, json_lines: bool) -> None:
    if json_lines:
        line = json_line("dry_run_summary", rows=pending, unusable=bad,
                         copied_from_identical=copied, skipped_done=skipped,
                         est_input_tokens=tokens_in, max_output_tokens=tokens_out,
                         est_cost_usd=None if cost is None else round(cost, 6))
    else:
        cost_text = f"${cost:.4f} at most" if cost is not None else \
            "unknown (no price for the model)"
        line = (f"dry run: {pending} rows would be captioned ({bad} unusable, {copied} "
                f"copied from identical images: left out of the estimate), skipped "
                f"{skipped} already done; estimated input tokens {tokens_in}, output at "
                f"most {tokens_out}; cost {cost_text}")
    print(line, file=sys.stderr)
