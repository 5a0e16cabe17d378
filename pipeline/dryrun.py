"""`--dry-run`: read the manifest and the images, show what would be sent and what it costs.

Nothing is sent and nothing is written: each pending row is planned exactly as a real
run would plan it (prompts rendered, images prepared, request built), and its token
estimate and cost are printed, with totals at the end.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from .adapters import get_adapter
from .checkpoint import Checkpoint, KeySet
from .errors import RowFailed
from .imageprep import ImagePolicy
from .images import ImageSource, default_executor
from .manifest import Manifest
from .plan import Plan
from .progress import Counters
from .settings import Settings


async def dry_run(s: Settings, stream: TextIO | None = None) -> int:
    stream = stream or sys.stdout
    manifest = Manifest(s.manifest)
    # Read-only: a dry run may sit beside a running job, so it neither locks nor repairs.
    done = await asyncio.to_thread(Checkpoint(s.out).done_keys, s.retry_errors) \
        if s.out.exists() else None
    adapter = get_adapter(s.api)
    price = s.price
    executor = default_executor()
    images = ImageSource(s.manifest.parent, ImagePolicy(s.max_edge, s.max_image_bytes), executor)
    counters = Counters()
    plan = Plan(manifest, done if done is not None else KeySet(), s.named_prompts, s.limit,
                counters)
    total_in = total_out = 0
    total_cost = 0.0
    bad = costed = 0
    print("id\tprompt_name\timage\tsent\test_input_tokens\tmax_output_tokens\test_cost_usd",
          file=stream)
    try:
        for group in plan:
            for row in group:
                try:
                    if row.error:
                        raise RowFailed(row.error, "bad_input")
                    image = await images.load(row)
                except RowFailed as e:
                    bad += 1
                    print(f"{row.id}\t{row.prompt_name}\t{row.image}\terror: {e.message}",
                          file=stream)
                    continue
                req = adapter.build_request(row, image, s)
                cost = price.cost(req.est_input_tokens, req.est_output_tokens) if price else None
                costed += 1
                total_in += req.est_input_tokens
                total_out += req.est_output_tokens
                total_cost += cost or 0.0
                sent = f"{image.width}x{image.height}" if image.width else "url"
                print(f"{row.id}\t{row.prompt_name}\t{row.image}\t{sent}\t"
                      f"{req.est_input_tokens}\t{req.est_output_tokens}\t"
                      f"{'' if cost is None else f'{cost:.6f}'}", file=stream)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    cost_text = f"${total_cost:.4f} at most" if price else "unknown (no price for the model)"
    print(f"dry run: {plan.pending} rows would be captioned ({bad} unusable), "
          f"skipped {counters.skipped_done} already done; estimated input tokens "
          f"{total_in}, output at most {total_out}; cost {cost_text}", file=sys.stderr)
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

