"""What a request costs: one rule, for the gateway (budgets, receipts) and auth (records).

A model's price is per million tokens, in one currency, and versioned (auth's
`model_prices`: a version applies from its `effective_from` on). Money is
`Decimal`, never a float::

    cost = (prompt_tokens * p + completion_tokens * output) / 1 000 000

where p is the cached price for a cached answer when the model has one, else
the input price, rounded half to even to 10 decimals (`COST_PLACES`). A
budget counts money in whole units of 1e-10 (`UNITS`), so a cost is exactly a
whole number of them, and a request's worst case (`Price.worst`) is rounded
up: what is reserved is never less than what is settled.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal

__all__ = ["COST_PLACES", "UNITS", "Price", "cost_of"]

COST_PLACES = 10  #: decimals a cost is rounded to, half to even (NUMERIC(20,10))
UNITS = 10**COST_PLACES  #: budget units per unit of currency
_MILLION = Decimal(1_000_000)
_QUANTUM = Decimal(1).scaleb(-COST_PLACES)


def cost_of(prompt_tokens: int, completion_tokens: int, cached: bool, *, input: Decimal, output: Decimal,
            cached_price: Decimal | None = None) -> Decimal:
    """What a request costs at these prices per million tokens (the rule above)."""
    prompt_price = cached_price if cached and cached_price is not None else input
    exact = (prompt_tokens * prompt_price + completion_tokens * output) / _MILLION
    return exact.quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class Price:
    """One version of a model's price per million tokens."""

    model: str
    input: Decimal
    output: Decimal
    cached: Decimal | None
    currency: str
    effective_from: float  #: epoch seconds

    def cost(self, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> Decimal:
        """What a request that used these tokens costs."""
        return cost_of(prompt_tokens, completion_tokens, cached, input=self.input, output=self.output,
                       cached_price=self.cached)

    def units(self, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> int:
        """`cost` in budget units (exact: a cost has `COST_PLACES` decimals)."""
        return int(self.cost(prompt_tokens, completion_tokens, cached) * UNITS)

    def worst(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The most a request of at most these tokens can cost, in budget units, rounded up."""
        prompt_price = max(self.input, self.cached) if self.cached is not None else self.input
        exact = (prompt_tokens * prompt_price + completion_tokens * self.output) * UNITS / _MILLION
        return int(exact.to_integral_value(rounding=ROUND_CEILING))
