"""What one request may cost and what it cost, at the price in force at its start.

    spend = Spend.of(caller, prices, model, at)      # may refuse (below)
    quota.admit(scopes, tokens, spend=spend.worst(prompt_tokens, max_tokens), ...)
    ...
    quota.settle(admission, tokens_used, spend.used(prompt_tokens, completion_tokens, cached))
    receipt cost, record cost: spend.cost(prompt_tokens, completion_tokens, cached)

A model without a price costs nothing (its records say so: no cost). Budgets
(money counters, quota/leases.py) are held only for callers that have one:
the worst case -- the prompt's token bound at the input price (or the cached
price if higher) and `max_tokens` at the output price, rounded up -- before
the work, the cost of what was used after. Refusals before anything is held:

* `UNAVAILABLE` (retry_safe) when the caller has a budget and this gateway
  has not loaded the prices yet (auth unreachable since it started);
* `FORBIDDEN` naming `model` when the model is priced in another currency
  than the caller's budgets.
"""

from __future__ import annotations

from decimal import Decimal

from shared.errors import Forbidden, Unavailable
from shared.pricing import UNITS, Price
from services.gateway.callers import Caller
from services.gateway.prices import PriceBook
from services.gateway.quota import MONEY_COUNTERS

__all__ = ["Spend"]


class Spend:
    """The price of one request (None: free) and whether budgets count it."""

    __slots__ = ("counted", "price")

    def __init__(self, price: Price | None, counted: bool) -> None:
        self.price = price
        self.counted = counted and price is not None  #: the caller has a budget and the model a price

    @classmethod
    def of(cls, caller: Caller, prices: PriceBook, model: str, at: float) -> Spend:
        budgeted = any(scope.limits.get(name) is not None for scope in caller.scopes for name in MONEY_COUNTERS)
        if budgeted and not prices.loaded:
            raise Unavailable("model prices are not known to this gateway yet", {"retry_safe": True})
        price = prices.price_of(model, at)
        if budgeted and price is not None and caller.currency is not None and price.currency != caller.currency:
            raise Forbidden(f"model {model!r} is priced in {price.currency}; this account's budgets are in "
                            f"{caller.currency}", {"param": "model"})
        return cls(price, budgeted)

    def worst(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Budget units to hold for a request of at most these tokens (0 when not counted)."""
        return self.price.worst(prompt_tokens, completion_tokens) if self.counted and self.price else 0

    def used(self, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> int:
        """Budget units a request that used these tokens keeps (0 when not counted)."""
        return self.price.units(prompt_tokens, completion_tokens, cached) if self.counted and self.price else 0

    def cost(self, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> Decimal | None:
        """The cost of these tokens (receipts and records), None without a price."""
        return self.price.cost(prompt_tokens, completion_tokens, cached) if self.price is not None else None

    def room(self, left: Decimal, prompt_tokens: int) -> int | None:
        """The most output tokens a budget with `left` can pay for beside the prompt; None
        when output is free (the budget does not bound it)."""
        if self.price is None or self.price.output == 0:
            return None
        spare = int(left * UNITS) - self.price.worst(prompt_tokens, 0)
        return max(0, int(Decimal(spare) * 1_000_000 / (self.price.output * UNITS)))
