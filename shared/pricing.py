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

from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

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
    """One version of a model's price per million tokens.

    Per request it is computed in integers (on every request's path): a price
    has at most 6 decimals, so p x 10^6 is a whole number of micro-units, and a
    token at p costs p x 10^6 / 100 budget units -- `cost_of`'s rule exactly,
    with the rounding done on whole numbers."""

    model: str
    input: Decimal
    output: Decimal
    cached: Decimal | None
    currency: str
    effective_from: float  #: epoch seconds
    _micro: tuple[int, int, int] = field(init=False, repr=False, compare=False)  #: input, output, cached x 10^6

    def __post_init__(self) -> None:
        micro = [int(p * _MILLION) for p in (self.input, self.output, self.input if self.cached is None else
                                              self.cached)]
        if any(Decimal(m) / _MILLION != p for m, p in zip(micro, (self.input, self.output))):
            raise ValueError(f"a price has at most 6 decimals: {self}")
        object.__setattr__(self, "_micro", tuple(micro))

    def units(self, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> int:
        """What a request that used these tokens costs, in budget units (rounded half to even)."""
        n = prompt_tokens * self._micro[2 if cached else 0] + completion_tokens * self._micro[1]
        whole, rest = divmod(n, 100)
        return whole + 1 if rest > 50 or (rest == 50 and whole % 2) else whole

    def cost(self, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> Decimal:
        """What a request that used these tokens costs (10 decimals)."""
        return Decimal(self.units(prompt_tokens, completion_tokens, cached)).scaleb(-COST_PLACES)

    def worst(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The most a request of at most these tokens can cost, in budget units, rounded up."""
        n = prompt_tokens * max(self._micro[0], self._micro[2]) + completion_tokens * self._micro[1]
        return -(-n // 100)
