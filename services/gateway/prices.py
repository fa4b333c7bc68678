"""The model prices a gateway charges by: auth's price versions, kept in step.

    prices = PriceBook(auth_client)
    async with prices:                       # loads now, then polls `auth.price_table` (polled.py)
        price = prices.price_of("llama3", at=time.time())   # a shared.pricing.Price, or None

Every second (`interval`) the book asks auth for the table's `version` and,
when it moved, for every version in force or scheduled. A request is priced
by the version in force at its start (`at`): the price its receipt states,
its budget settles and its usage record carries, so the three agree. A
version scheduled ahead (`effective_from` later than a poll) is known before
it applies, and applies exactly then; one set to apply at once reaches this
gateway within a poll.

Until the first load succeeds `loaded` is False: a caller with money budgets
is then refused `UNAVAILABLE` (retry_safe) rather than served unpriced.
"""

from __future__ import annotations

import bisect
from datetime import datetime
from decimal import Decimal
from typing import Any, Self

from shared.pricing import Price
from services.auth.client import AuthClient
from services.gateway.polled import Polled

__all__ = ["PriceBook"]


class PriceBook:
    """Price versions by model (see the module doc)."""

    def __init__(self, auth: AuthClient, *, interval: float = 1.0, timeout: float = 2.0) -> None:
        self._auth = auth
        self._timeout = timeout
        self._models: dict[str, tuple[list[float], list[Price]]] = {}  #: model -> (starts, versions), by start
        self._table = Polled("model prices", self._fetch, self._apply, interval=interval)

    @property
    def loaded(self) -> bool:
        return self._table.loaded

    async def __aenter__(self) -> Self:
        await self._table.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._table.__aexit__(*exc_info)

    def price_of(self, model: str, at: float) -> Price | None:
        """The version of `model`'s price in force at `at` (epoch seconds), or None."""
        entry = self._models.get(model)
        if entry is None:
            return None
        index = bisect.bisect_right(entry[0], at) - 1
        return entry[1][index] if index >= 0 else None

    async def refresh(self) -> None:
        """Ask auth once; apply the table if it changed."""
        await self._table.refresh()

    async def _fetch(self, since: int | None) -> tuple[int, Any]:
        answer = await self._auth.price_table(since=since, timeout=self._timeout)
        return answer["version"], answer["prices"]

    def _apply(self, rows: list[Any]) -> None:
        self._models = _by_model(rows)


def _by_model(rows: list[Any]) -> dict[str, tuple[list[float], list[Price]]]:
    versions: dict[str, list[Price]] = {}
    for row in rows:
        price = Price(row["model"], Decimal(row["input"]), Decimal(row["output"]),
                      None if row["cached"] is None else Decimal(row["cached"]), row["currency"],
                      datetime.fromisoformat(row["effective_from"]).timestamp())
        versions.setdefault(price.model, []).append(price)
    table = {}
    for model, prices in versions.items():
        prices.sort(key=lambda p: p.effective_from)
        table[model] = ([p.effective_from for p in prices], prices)
    return table
