"""The simulator's flex tier (OpenAI ``service_tier: "flex"``): answers say the tier they
were served on, and ``--flex-unavailable-rate`` of flex requests are refused with
"429 Resource Unavailable" (no capacity now: not a rate limit, no Retry-After, and
no rate-limit headers change). docs/protocol.md §18.
"""

from __future__ import annotations

import random

from aiohttp import web

from .errors import ApiError

__all__ = ["FLEX_RNG", "capacity_error", "install", "refused", "served_tier"]

FLEX_RNG = web.AppKey("FLEX_RNG", random.Random)
FLEX_REFUSED = web.AppKey("FLEX_REFUSED", list)  # one entry per refusal (tests count)


def install(app: web.Application, seed: int) -> None:
    app[FLEX_RNG] = random.Random(seed + 2)  # its own draws: the fault schedule stays put
    app[FLEX_REFUSED] = []


def served_tier(requested: object) -> str | None:
    """The tier an answer reports: flex when asked for, else the standard ("default")."""
    if requested is None:
        return None
    return "flex" if requested == "flex" else "default"


def capacity_error() -> ApiError:
    return ApiError(429, "Resource unavailable: the flex tier has no capacity for this "
                         "request right now. Retry later or use the default tier.",
                    "resource_unavailable", "rate_limit_error", "resource_unavailable")


def refused(app: web.Application, tier: str | None, rate: float) -> bool:
    """Whether this flex request is refused for capacity (always one draw per flex
    request, so request k of a seeded run meets the same fate)."""
    if tier != "flex":
        return False
    if app[FLEX_RNG].random() < rate:
        app[FLEX_REFUSED].append(1)
        return True
    return False
