"""`python -m pipeline cancel OUT`: cancel the batch lane's batches in flight.

Each batch the ledger (``OUT/_batches/``) records as created and not ended is cancelled
at its provider (the endpoint the ledger recorded, or ``--base-url``; the key from the
environment, as for ``caption``). The ledger is left to the next ``caption --lane
batch`` run: it collects what finished before the cancel, and the requests the cancel
stopped are pending again (class ``canceled``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from ..batch.ledger import Ledger
from ..batch.providers import get_api
from ..errors import PipelineError
from ..pacing.retry import RetryPolicy
from ..redact import add_secret
from ..wire.adapters import get_adapter
from ..wire.transport import Transport


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline cancel")
    p.add_argument("out", type=Path, help="the output dataset directory")
    p.add_argument("--base-url", help="API root (default: the one the batches were sent to)")
    ns = p.parse_args(argv)
    entries = [e for e in Ledger(ns.out / "_batches").entries()
               if e.batch_id and e.state in ("created", "creating")]
    if not entries:
        print(f"{ns.out}: no batch in flight")
        return 0
    return asyncio.run(_cancel(entries, ns.base_url))


async def _cancel(entries: list, base_url: str | None) -> int:  # type: ignore[type-arg]
    code = 0
    for e in entries:
        adapter = get_adapter(e.api)
        key = next((os.environ[n] for n in adapter.key_env if os.environ.get(n)), "")
        add_secret(key)
        async with Transport(base_url or e.endpoint, adapter.auth_headers(key), 2, 15.0,
                             60.0) as t:
            api = get_api(e.api, t, RetryPolicy(3, 1.0, 10.0, 60.0), 1 << 20)
            try:
                remote = await api.cancel(e.batch_id)
                print(f"batch {e.lid} {e.batch_id}: {remote.status}")
            except PipelineError as err:
                print(f"error: batch {e.lid} {e.batch_id}: {err.message}", file=sys.stderr)
                code = 1
    return code
