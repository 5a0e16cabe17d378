"""One worker and everything it stands on, assembled the same way for every engine.

The local runner builds one for the whole run; each Ray actor builds one with its
share of the concurrency, image threads and budgets. Whatever needs closing (HTTP
sessions, the image thread pool) is registered on the caller's exit stack.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ..images.dedupe import Dedupe
from ..images.download import ImageFetcher
from ..images.load import ImageSource, ReadLimits
from ..images.pool import DaemonPool
from ..images.prepare import ImagePolicy
from ..keys import ImageRefs
from ..pacing.cost import CostBudget
from ..pacing.limiter import Budgets, Limiter
from ..pacing.retry import RetryPolicy
from ..quality import Gate
from ..records import Original
from ..settings import Settings
from ..sources.choose import source_base
from ..wire.adapters import get_adapter
from ..wire.transport import Transport
from .worker import Worker


async def build_worker(stack: contextlib.AsyncExitStack, s: Settings, *, concurrency: int,
                       budgets: Budgets, max_cost: float | None, executor: DaemonPool,
                       lookup_done: Callable[[str], Original | None] | None,
                       should_stop: Callable[[], bool],
                       image_refs: ImageRefs | None = None,
                       gate: Gate | None = None) -> Worker:
    """Protocol, transport, image preparation, limits, cost budget and dedupe."""
    adapter = get_adapter(s.api)
    policy = RetryPolicy(s.retries, s.backoff_base, s.backoff_max, s.max_retry_after,
                         s.max_rate_wait)
    transport = await stack.enter_async_context(Transport(
        s.endpoint, adapter.auth_headers(s.api_key.reveal()), concurrency,
        s.connect_timeout, s.idle_timeout))
    stack.callback(executor.shutdown, wait=False, cancel_futures=True)
    fetcher = None
    if s.fetch_urls:
        fetcher = await stack.enter_async_context(
            ImageFetcher(policy, s.max_download_bytes, s.download_timeout))
    images = ImageSource(source_base(s.manifest, s.manifest_format),
                         ImagePolicy(s.max_edge, s.max_image_bytes), executor, fetcher,
                         ReadLimits(s.max_file_bytes, s.image_timeout))
    price = s.price
    limiter = Limiter(budgets, concurrency, max_wait=s.max_retry_after)
    return Worker(s, adapter, transport, images, limiter, policy,
                  should_stop=should_stop,
                  dedupe=Dedupe(lookup_done) if s.dedupe else None,
                  budget=CostBudget(price, max_cost) if price is not None else None,
                  image_refs=image_refs, gate=gate)
