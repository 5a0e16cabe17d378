"""The simulator's batch APIs: OpenAI Files + Batches, and Anthropic Message Batches.

OpenAI (docs/protocol.md §17.1): ``POST /v1/files`` (multipart, ``purpose=batch``),
``GET /v1/files``, ``GET /v1/files/{id}/content``, ``POST /v1/batches``,
``GET /v1/batches[/{id}]``, ``POST /v1/batches/{id}/cancel``. Anthropic (§17.2):
``POST /v1/messages/batches``, ``GET /v1/messages/batches[/{id}]``,
``GET /v1/messages/batches/{id}/results``, ``POST /v1/messages/batches/{id}/cancel``.

State lives in memory for the server's life. ``app[BATCH].creates`` counts every batch
created (tests of crash recovery read it: a resubmission would show as a second one).
"""

from __future__ import annotations

import random
from typing import Any

from aiohttp import web

from . import batch_anthropic as anthropic
from . import batch_openai as openai
from .batch_state import BATCH, INVALID_KEY, BatchState
from .batch_work import BatchConfig

__all__ = ["BATCH", "INVALID_KEY", "BatchConfig", "BatchState", "add_arguments",
           "config_from", "install"]


def install(app: web.Application, config: BatchConfig, seed: int, sim_config: Any) -> None:
    app[BATCH] = BatchState(config, seed, sim_config, rng=random.Random(seed + 1))
    r = app.router
    r.add_post("/v1/files", openai.upload_file)
    r.add_get("/v1/files", openai.list_files)
    r.add_get("/v1/files/{file_id}/content", openai.file_content)
    r.add_post("/v1/batches", openai.create_openai)
    r.add_get("/v1/batches", openai.list_openai)
    r.add_get("/v1/batches/{batch_id}", openai.get_openai)
    r.add_post("/v1/batches/{batch_id}/cancel", openai.cancel_openai)
    r.add_post("/v1/messages/batches", anthropic.create_anthropic)
    r.add_get("/v1/messages/batches", anthropic.list_anthropic)
    r.add_get("/v1/messages/batches/{batch_id}", anthropic.get_anthropic)
    r.add_get("/v1/messages/batches/{batch_id}/results", anthropic.results_anthropic)
    r.add_post("/v1/messages/batches/{batch_id}/cancel", anthropic.cancel_anthropic)


def add_arguments(add: Any) -> None:
    """``simulate --batch-*``: the batch APIs' scenario."""
    d = BatchConfig()
    add("--batch-delay", type=float, default=d.delay,
        help="seconds from create until a batch ends")
    add("--batch-fail-rate", type=float, default=d.fail_rate,
        help="fraction of batch requests that end as a server error (partial failure)")
    add("--batch-expire-rate", type=float, default=d.expire_rate,
        help="fraction of batch requests left unfinished: their batch expires")
    add("--batch-in-order", action="store_true", help="batch results in request order "
                                                      "(default: shuffled)")
    add("--batch-max-bytes", type=int, default=d.max_bytes,
        help="largest batch input file / create body; larger gets HTTP 413")


def config_from(args: Any) -> BatchConfig:
    return BatchConfig(delay=args.batch_delay, fail_rate=args.batch_fail_rate,
                       expire_rate=args.batch_expire_rate, in_order=args.batch_in_order,
                       max_bytes=args.batch_max_bytes)
