"""`--lane batch --dry-run`: the batch plan — request files, sizes, requests, cost.

The split planner runs exactly as a real run would (images prepared, bodies built,
files cut at the caps) into a temporary folder that is removed afterwards: nothing is
sent, nothing is written to OUT, no endpoint is needed. Rows a batch in flight will
answer are left out, as the run would leave them out.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from ..batch.build import Builder
from ..batch.ledger import Entry, Ledger, in_flight_keys
from ..batch.providers import get_api
from ..images.dedupe import ImageIndex
from ..images.load import ImageSource, ReadLimits, default_executor
from ..images.prepare import ImagePolicy
from ..keys import KeySet
from ..logs import json_line
from ..pacing.cost import CostBudget
from ..pacing.retry import RetryPolicy
from ..records import ManifestRow, PreparedImage, ResultRow
from ..settings import Settings
from ..sources.choose import open_source, source_base
from ..sources.plan import Plan
from ..store.checkpoint import Checkpoint
from ..wire.adapters import get_adapter


async def batch_plan(s: Settings, stream: TextIO | None = None) -> int:
    stream = stream or sys.stdout
    json_lines = s.log_format == "json"
    scan = await asyncio.to_thread(Checkpoint(s.out).scan) if s.out.exists() else None
    done = scan.done(s.retry_errors) if scan is not None else KeySet()
    index = await asyncio.to_thread(ImageIndex, scan.parts) \
        if scan is not None and s.dedupe else None
    manifest = open_source(s.manifest, s.manifest_format, s.max_file_bytes)
    executor = default_executor()
    images = ImageSource(source_base(s.manifest, s.manifest_format),
                         ImagePolicy(s.max_edge, s.max_image_bytes),
                         executor, limits=ReadLimits(s.max_file_bytes, s.image_timeout))
    scratch = Path(tempfile.mkdtemp(prefix="caption-batch-plan-"))
    files: list[Entry] = []
    kept: list[str] = []

    async def sealed(entry: Entry) -> None:
        files.append(entry)
        Ledger(scratch).discard_files(entry)

    def keep(row: ResultRow) -> None:
        kept.append(row.error_class or "copy")

    price = s.price
    api = get_api(s.api, None, RetryPolicy(), 1)  # type: ignore[arg-type]  # lines only
    def prepare(row: ManifestRow) -> asyncio.Future[PreparedImage]:
        return asyncio.ensure_future(images.load(row))

    builder = Builder(s, Ledger(scratch), api, get_adapter(s.api), prepare, "dry-run", keep,
                      index if index is not None and len(index) else None,
                      CostBudget(price, None) if price else None)
    try:
        await builder.build(Plan(manifest, done, s.named_prompts, s.limit).groups(), sealed,
                            lambda: False, skip=in_flight_keys(Ledger(s.out / "_batches")))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        manifest.close()
        shutil.rmtree(scratch, ignore_errors=True)
    for n, e in enumerate(files, 1):
        if json_lines:
            print(json_line("batch_plan_file", file=n, requests=e.requests, rows=e.rows,
                            bytes=e.bytes, est_cost_usd=e.est_cost_usd), file=stream)
        else:
            print(f"file {n}: {e.requests} requests ({e.rows} rows), {e.bytes} bytes, "
                  f"est. ${e.est_cost_usd:.4f}", file=stream)
    total = sum(e.est_cost_usd for e in files)
    cost = f"${total:.4f} at most (batch prices)" if price else "unknown (no price)"
    print(f"batch plan: {len(files)} files, {sum(e.requests for e in files)} requests, "
          f"{sum(e.bytes for e in files)} bytes (caps: {builder.caps.requests} requests, "
          f"{builder.caps.bytes} bytes a file); {len(kept)} rows need no request; cost "
          f"{cost}", file=sys.stderr)
    return 0
