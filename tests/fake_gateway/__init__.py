"""The one scriptable fake server package of the tests: every server a test talks to.

All of them run on 127.0.0.1 in a background thread over real TCP, record every
request (arrival and end time, method, path, Host, headers, body, status, outcome)
and never import anything from ``pipeline`` (a client bug must not be mirrored by
the server):

* ``Gateway`` (gateway.py): the OpenAI-compatible gateway, answering by the scenario
  the request's image URL names (``img("C18", fail=2)``); the conformance cases
  C01..C40 of docs/protocol.md §10 and the extra faults live in scenarios_*.py, and
  ``gateway.on(name, handler)`` scripts one for a test. The ``gateway`` fixture.
* ``LoopbackServer`` (server.py): a server of the test's own shape, answering from a
  route table or one handler (another origin, a redirecting web server, ...).
* ``ImageHost`` (images.py): image routes for ``--fetch-urls``, with per-Host
  concurrency counts.
* ``AnthropicGateway`` (anthropic.py): ``POST /v1/messages`` answered by a script.
* ``RawServer`` (server.py): fixed bytes on a bare socket, where aiohttp cannot write
  them (a 0xff byte in a header).

Handlers get an ``Exchange`` (``Ctx`` on the gateway): the request, its record, and
writers for bodies that end cleanly, are cut (FIN or RST) or go silent.

Not here: the bundled simulator (``pipeline/simulator``, ``caption simulate``) is the
product's own demo and benchmark server: realistic latency, token pacing and the rate
limiters of real APIs, which the limiter tests and ``make bench`` measure against. It is
a product feature with its own tests (tests/unit/test_simulator.py), not a test fake:
this package scripts exact bytes and faults, the simulator models a service.
"""

from __future__ import annotations

from . import scenarios_http, scenarios_stream  # noqa: F401  (register the scenarios)
from .anthropic import (
                        A_MODEL,
                        A_VERSION,
                        PING,
                        AnthropicGateway,
                        ARequest,
                        a_delta,
                        a_event,
                        a_start,
                        a_stream,
)
from .gateway import SCENARIOS, Ctx, Gateway, Recorded, scenario
from .images import ImageHost, Route
from .scenarios_http import C32_MESSAGE, C40_MESSAGE
from .scenarios_stream import C24_MESSAGE, C27_USAGE, retry_ok
from .server import SERVER_LOG, Exchange, LoopbackServer, RawServer, Seen
from .sse import (
                        LOCAL_CAPTION,
                        MODEL,
                        PARTIAL,
                        RETRY_CAPTION,
                        USAGE_C01,
                        USAGE_OK,
                        chunk,
                        decode_data_uri,
                        default_caption,
                        done,
                        http_date,
                        img,
                        split_after,
                        sse,
                        standard_events,
                        stream_body,
                        usage_chunk,
)

__all__ = [
    "A_MODEL", "A_VERSION", "ARequest", "AnthropicGateway", "C24_MESSAGE", "C27_USAGE",
    "C32_MESSAGE", "C40_MESSAGE", "Ctx", "Exchange", "Gateway", "ImageHost", "LOCAL_CAPTION",
    "LoopbackServer", "MODEL", "PARTIAL", "PING", "RETRY_CAPTION", "RawServer", "Recorded",
    "Route", "SCENARIOS", "SERVER_LOG", "Seen", "USAGE_C01", "USAGE_OK", "a_delta", "a_event",
    "a_start", "a_stream", "chunk", "decode_data_uri", "default_caption", "done",
    "http_date", "img", "retry_ok", "scenario", "split_after", "sse", "standard_events",
    "stream_body", "usage_chunk",
]
