"""Specification of the cost budget (pacing/cost.py): prices, cost per row, --max-cost.

The budget holds before each request: what was spent, plus every reservation in flight,
plus this request's estimate must stay within the limit, so a run never overshoots.
"""

from __future__ import annotations

import pytest

from pipeline.pacing.cost import PRICES, BudgetReached, CostBudget, Price, price_for

PER_M = Price(input=2.0, output=10.0)  # USD per million tokens


def test_cost_is_tokens_times_the_price_per_million() -> None:
    assert PER_M.cost(1_000_000, 0) == 2.0
    assert PER_M.cost(500, 100) == (500 * 2.0 + 100 * 10.0) / 1e6


def test_unknown_token_counts_cost_nothing() -> None:
    assert PER_M.cost(None, None) == 0.0 and PER_M.cost(None, 1000) == 0.01


def test_a_model_takes_the_price_of_the_longest_name_it_starts_with() -> None:
    assert price_for("gpt-4o-mini-2024-07-18", None, None) == Price(*PRICES["gpt-4o-mini"])
    assert price_for("gpt-4o-2024-08-06", None, None) == Price(*PRICES["gpt-4o"])


def test_a_gateways_provider_prefix_and_case_do_not_hide_the_model() -> None:
    assert price_for("openai/GPT-4o-mini", None, None) == Price(*PRICES["gpt-4o-mini"])


def test_a_model_without_a_price_has_none() -> None:
    assert price_for("llava-13b", None, None) is None


def test_given_prices_win_and_a_missing_half_is_free() -> None:
    assert price_for("gpt-4o", 1.0, None) == Price(1.0, 0.0)
    assert price_for("llava-13b", None, 4.0) == Price(0.0, 4.0)


def test_a_reservation_within_the_budget_is_held_until_settled() -> None:
    budget = CostBudget(PER_M, max_cost=1.0)
    est = budget.reserve(100_000, 10_000)  # $0.20 + $0.10
    assert est == pytest.approx(0.3) and budget.reserved == pytest.approx(0.3)


def test_a_request_that_could_pass_the_limit_is_refused() -> None:
    budget = CostBudget(PER_M, max_cost=0.5)
    budget.reserve(100_000, 10_000)           # $0.30 in flight
    with pytest.raises(BudgetReached, match=r"\$0\.3000 in flight, of --max-cost \$0\.5000"):
        budget.reserve(100_000, 10_000)       # $0.60 > $0.50, although nothing was spent
    assert budget.reserved == pytest.approx(0.3)  # the refused one holds nothing


def test_a_request_that_exactly_fills_the_budget_is_allowed() -> None:
    budget = CostBudget(Price(1.0, 0.0), max_cost=1.0)
    budget.reserve(1_000_000, 0)
    with pytest.raises(BudgetReached):
        budget.reserve(1, 0)


def test_settling_replaces_the_reservation_by_what_was_spent() -> None:
    budget = CostBudget(PER_M, max_cost=1.0)
    est = budget.reserve(100_000, 10_000)
    actual = budget.settle(est, 100_000, 500)  # the answer was short
    assert actual == pytest.approx(0.205)
    assert (budget.spent, budget.reserved) == (pytest.approx(0.205), pytest.approx(0.0))


def test_what_earlier_runs_spent_counts_against_the_limit() -> None:
    budget = CostBudget(PER_M, max_cost=0.5, spent=0.4)
    with pytest.raises(BudgetReached, match=r"spent \$0\.4000"):
        budget.reserve(100_000, 0)  # $0.20


def test_without_a_limit_nothing_is_refused() -> None:
    budget = CostBudget(PER_M, max_cost=None)
    for _ in range(3):
        budget.reserve(10**9, 10**9)
    assert budget.reserved == pytest.approx(3 * (2000 + 10_000))
