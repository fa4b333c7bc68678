"""The model prices a gateway charges by: auth's price versions, kept in step.

    prices = PriceBook(auth_client)
    async with prices:                       # loads now, then polls `auth.price_table`
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

import asyncio
import bisect
from datetime import datetime
from decimal import Decimal
from typing import Any, Self

from shared.errors import MeshError
from shared.logging import get_logger
from shared.pricing import Price
from shared.tasks import Background
from services.auth.client import AuthClient

__all__ = ["PriceBook"]

log = get_logger(__name__)


class PriceBook:
    """Price versions by model (see the module doc)."""

    def __init__(self, auth: AuthClient, *, interval: float = 1.0, timeout: float = 2.0) -> None:
        self._auth = auth
        self._interval = interval
        self._timeout = timeout
        self._version: int | None = None
        self._models: dict[str, tuple[list[float], list[Price]]] = {}  #: model -> (starts, versions), by start
        self._background = Background()
        self.loaded = False

    async def __aenter__(self) -> Self:
        try:
            await self.refresh()
        except MeshError as exc:  # auth may come up after us: the loop keeps asking
            log.warning("model prices not loaded yet", error=exc.message)
        self._background.start(self._polling(), name="price book")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()

    def price_of(self, model: str, at: float) -> Price | None:
        """The version of `model`'s price in force at `at` (epoch seconds), or None."""
        entry = self._models.get(model)
        if entry is None:
            return None
        index = bisect.bisect_right(entry[0], at) - 1
        return entry[1][index] if index >= 0 else None

    async def refresh(self) -> None:
        """Ask auth once; apply the table if it changed."""
        answer = await self._auth.price_table(since=self._version, timeout=self._timeout)
        if answer["prices"] is not None:
            self._models = _by_model(answer["prices"])
            log.info("model prices loaded", version=answer["version"], models=len(self._models))
        self._version = answer["version"]
        self.loaded = True

    async def _polling(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
                failing = False
            except MeshError as exc:
                if not failing:
                    log.warning("cannot refresh model prices; charging by those known", error=exc.message)
                failing = True


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
