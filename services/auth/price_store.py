"""The SQL of model prices (`auth.set_price`, `auth.prices`); records are priced in usage_store.py.

A price is a version: a row of `model_prices` in force from its
`effective_from` until the next version of the same model begins. Versions
are only added, never changed, so usage already stored keeps the price it was
stored with. A version may not begin in the past (by the database's clock):
records of that past may already be stored at the old price, and later ones
would get the new one. Each version is audited (`price_set`) in the
transaction that adds it.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from shared.db import translate_errors, unavailable_when_down
from shared.errors import InvalidParams

__all__ = ["PriceStore"]

_COLUMNS = "model, input_price, output_price, cached_price, currency, effective_from, created_at"

_INSERT = f"""
INSERT INTO model_prices (model, input_price, output_price, cached_price, currency, effective_from, actor_id)
SELECT $1, $2, $3, $4, $5, COALESCE($6, now()), $7
WHERE COALESCE($6, now()) >= now()
RETURNING {_COLUMNS}, now() AS now
"""

# The version in force now for each model, and every version to come.
_PRICES = f"""
SELECT {_COLUMNS}, now() AS now FROM model_prices p
WHERE ($1::text IS NULL OR p.model = $1)
  AND (p.effective_from > now()
       OR p.effective_from = (SELECT max(q.effective_from) FROM model_prices q
                              WHERE q.model = p.model AND q.effective_from <= now()))
ORDER BY p.model, p.effective_from
"""


@unavailable_when_down()
class PriceStore:
    """The `model_prices` table, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def set_price(
        self, model: str, input_price: Decimal, output_price: Decimal, cached_price: Decimal | None,
        currency: str, effective_from: datetime | None, *, actor_id: int | None, by: str,
    ) -> asyncpg.Record:
        """Add a version from `effective_from` (None: now), audited; `CONFLICT` when the model
        already has one from that very moment, `INVALID_PARAMS` when it is in the past."""
        async with self.pool.acquire() as conn, conn.transaction():
            with translate_errors("this model already has a price from that moment"):
                row = await conn.fetchrow(_INSERT, model, input_price, output_price, cached_price, currency,
                                          effective_from, actor_id)
            if row is None:
                raise InvalidParams("effective_from is in the past: a price applies from now on",
                                    {"param": "effective_from"})
            details: dict[str, Any] = {
                "model": model, "input": str(input_price), "output": str(output_price),
                "cached": None if cached_price is None else str(cached_price), "currency": currency,
                "effective_from": row["effective_from"].isoformat(), "by": by,
            }
            await conn.execute(
                "INSERT INTO audit_log (event, user_id, actor_id, details) VALUES ('price_set', NULL, $1, $2::jsonb)",
                actor_id, json.dumps(details))
            return row

    async def version(self) -> int:
        """Grows with every version added (versions are never changed or removed): the newest id."""
        return int(await self.pool.fetchval("SELECT coalesce(max(id), 0) FROM model_prices"))

    async def prices(self, model: str | None) -> list[asyncpg.Record]:
        """The version in force now of each model (or of `model`), then the versions to come."""
        return await self.pool.fetch(_PRICES, model)
