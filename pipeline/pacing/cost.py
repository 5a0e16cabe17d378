"""What a run costs: prices per million tokens, cost per row, and a budget that holds.

The budget is checked for each request once its rate permit is granted, that is just
before it is sent: spent plus the estimate of every request in flight plus this one
must stay within ``--max-cost``, so the run stops taking new rows before it can
overshoot, and what was in flight finishes. Rows still waiting for the limiter hold
no reservation, so a budget that affords one row always captions at least one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BATCH_DISCOUNT", "Price", "batch_price_for", "price_for", "CostBudget",
           "BudgetReached"]

# OpenAI Batch and Anthropic Message Batches bill half the online price (docs/protocol.md
# §17): a batch row costs this share of the online prices unless batch prices are given.
BATCH_DISCOUNT = 0.5

# USD per million tokens (input, output) as published by the providers; a job file or
# --price-in/--price-out overrides them (gateways resell at their own prices).
PRICES: dict[str, tuple[float, float]] = {
    "claude-3-5-sonnet": (3.0, 15.0), "claude-3-7-sonnet": (3.0, 15.0),
    "claude-sonnet-4": (3.0, 15.0), "claude-3-5-haiku": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25), "claude-opus-4": (15.0, 75.0),
    "gpt-4o-mini": (0.15, 0.6), "gpt-4o": (2.5, 10.0), "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1": (2.0, 8.0), "gemini-2.0-flash": (0.1, 0.4), "gemini-1.5-flash": (0.075, 0.3),
}


@dataclass(frozen=True)
class Price:
    input: float   # USD per million input tokens
    output: float  # USD per million output tokens

    def cost(self, tokens_in: int | None, tokens_out: int | None) -> float:
        return ((tokens_in or 0) * self.input + (tokens_out or 0) * self.output) / 1e6


def price_for(model: str, price_in: float | None, price_out: float | None) -> Price | None:
    """The given prices, else the table's entry whose name the model starts with."""
    if price_in is not None or price_out is not None:
        return Price(price_in or 0.0, price_out or 0.0)
    m = model.lower().split("/")[-1]
    for name in sorted(PRICES, key=len, reverse=True):  # gpt-4o-mini before gpt-4o
        if m.startswith(name):
            return Price(*PRICES[name])
    return None


def batch_price_for(online: Price | None, batch_in: float | None,
                    batch_out: float | None) -> Price | None:
    """The batch lane's prices: the given ones, else half the online price (each side)."""
    if online is None and batch_in is None and batch_out is None:
        return None
    base = online or Price(0.0, 0.0)
    return Price(batch_in if batch_in is not None else base.input * BATCH_DISCOUNT,
                 batch_out if batch_out is not None else base.output * BATCH_DISCOUNT)


class BudgetReached(Exception):
    """Taking this request could pass ``--max-cost``: stop taking new rows."""


class CostBudget:
    def __init__(self, price: Price, max_cost: float | None, spent: float = 0.0) -> None:
        self.price = price
        self.max_cost = max_cost
        self.spent = spent
        self.reserved = 0.0

    def affords(self, est_in: int, est_out: int) -> bool:
        """Whether ``reserve`` would accept this estimate now (nothing is reserved)."""
        est = self.price.cost(est_in, est_out)
        return self.max_cost is None or self.spent + self.reserved + est <= self.max_cost

    def check(self, est_in: int, est_out: int, price: Price | None = None) -> None:
        """Before waiting for a permit: stop at once if even an idle run could not pay.
        ``price``: this request's, when it is not the run's (a service tier's)."""
        est = (price or self.price).cost(est_in, est_out)
        if self.max_cost is not None and self.spent + est > self.max_cost:
            raise BudgetReached(f"cost budget reached: spent ${self.spent:.4f} of --max-cost "
                                f"${self.max_cost:.4f}; the next row needs ${est:.4f}")

    def reserve(self, est_in: int, est_out: int, price: Price | None = None) -> float:
        est = (price or self.price).cost(est_in, est_out)
        if self.max_cost is not None and self.spent + self.reserved + est > self.max_cost:
            raise BudgetReached(f"cost budget reached: spent ${self.spent:.4f}, "
                                f"${self.reserved:.4f} in flight, of --max-cost "
                                f"${self.max_cost:.4f}")
        self.reserved += est
        return est

    def settle(self, reserved: float, tokens_in: int | None, tokens_out: int | None,
               price: Price | None = None) -> float:
        """Replace a reservation by what was really spent; returns the actual cost."""
        self.reserved -= reserved
        actual = (price or self.price).cost(tokens_in, tokens_out)
        self.spent += actual
        return actual
