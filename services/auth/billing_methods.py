"""The usage, cost, budget and price handlers of `AuthService`.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg

from shared.errors import Forbidden, InvalidParams
from shared.logging import get_logger
from shared.rpc import method
from services.auth import prices as money
from services.auth import limits, reports
from services.auth.records import parse_batch
from services.auth.service_base import KEEP, AuthBase, iso, parse_day, user_ref

__all__ = ["BillingMethods"]

log = get_logger(__name__)

_MAX_RANGE_DAYS = 366


class BillingMethods(AuthBase):
    """Usage records in, usage, reports and prices out."""

    # -- usage ---------------------------------------------------------------------------

    @method(idempotent=True, roles=("gateway",))
    async def record_usage(self, batch: list) -> dict[str, int]:  # type: ignore[type-arg]
        """Internal: store usage records; a request id already stored is not counted again. The
        spending alerts of their users and keys are fired before the answer (alert_methods.py), so a
        batch retried after a failure is looked at again."""
        counts, user_ids, key_ids = await self._usage.record_naming(parse_batch(batch))
        await self._alert(user_ids, key_ids)
        return counts

    @method(idempotent=True, roles=("metrics",))
    async def active_users(self) -> dict[str, int]:
        """Internal: distinct users with a request in the last hour and 24 hours."""
        return await self._usage.active_users()

    @method(public=True, idempotent=True)
    async def usage(self, token: str, start: str | None = None, end: str | None = None) -> dict[str, Any]:
        """Per UTC day and per key, from `start` to `end` (ISO dates, inclusive; default 30 days)."""
        user = await self._authenticate(token)
        last = parse_day(end, "end") if end is not None else datetime.now(timezone.utc).date()
        first = parse_day(start, "start") if start is not None else last - timedelta(days=29)
        if first > last or (last - first).days >= _MAX_RANGE_DAYS:
            raise InvalidParams(f"start must be before end, at most {_MAX_RANGE_DAYS} days apart")
        rows = await self._usage.daily(user["id"], first, last)
        costs = await self._usage.costs(user["id"], first, last)
        by_day_key: dict[tuple[date, int | None], list[asyncpg.Record]] = {}
        for c in costs:
            by_day_key.setdefault((c["day"], c["key_id"]), []).append(c)
        days = [{
            "day": r["day"].isoformat(), "key_id": r["key_id"], "key_name": r["key_name"],
            "key_prefix": r["key_prefix"], "requests": r["requests"],
            "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
            "tokens": r["prompt_tokens"] + r["completion_tokens"], "errors": r["errors"],
            "cache_hits": r["cache_hits"], **_cost_totals(by_day_key.get((r["day"], r["key_id"]), [])),
        } for r in rows]
        totals: dict[str, Any] = {f: sum(d[f] for d in days) for f in
                                  ("requests", "prompt_tokens", "completion_tokens", "tokens", "errors",
                                   "cache_hits")}
        totals.update(_cost_totals(costs))
        models = [{
            "day": c["day"].isoformat(), "key_id": c["key_id"], "model": c["model"],
            "currency": c["currency"] or None, "requests": c["requests"],
            "cost": money.money(c["cost"]) if c["currency"] else None, "unpriced": c["unpriced"],
        } for c in costs]
        return {"start": first.isoformat(), "end": last.isoformat(), "days": days, "totals": totals,
                "costs": models}

    @method(public=True, idempotent=True)
    async def report(self, token: str, start: str | None = None, end: str | None = None,
                     group_by: str = "day", by: str | None = None) -> dict[str, Any]:
        """The caller's cost and usage per UTC day, ISO week or month (`group_by`), and per model or
        key (`by`), from `start` to `end` (YYYY-MM-DD, inclusive; default the last 30 days, at most 366).
        See reports.py for the rows' shape."""
        user = await self._authenticate(token)
        first, last = reports.day_range(start, end)
        period, dimension = reports.check_period(group_by), reports.check_by(by)
        # One user: the seam where an organisation's report would pass its members (reports.py).
        records = await self._usage.report([user["id"]], first, last, period, dimension)
        return {"start": first.isoformat(), "end": last.isoformat(), "group_by": period, "by": dimension,
                "rows": reports.report_rows(records, dimension), "totals": reports.report_totals(records)}

    @method(public=True, idempotent=True)
    async def top_spenders(self, token: str | None = None, start: str | None = None, end: str | None = None,
                           limit: int = 10) -> dict[str, Any]:
        """Admins (by token) or the operator (no token): the `limit` (1-100) users who spent most in
        each currency from `start` to `end` (as `report`), by cost then requests; the requests
        without a price are ranked apart (`currency` None), by their number."""
        await self._admin_or_operator(token)
        first, last = reports.day_range(start, end)
        records = await self._usage.top_spenders(first, last, reports.check_limit(limit))
        return {"start": first.isoformat(), "end": last.isoformat(), "spenders": reports.spender_rows(records)}

    # -- budgets -------------------------------------------------------------------------

    @method(public=True, idempotent=True)
    async def set_budget(self, token: str, spend_per_day: Any = KEEP, spend_per_month: Any = KEEP,
                         user: int | str | None = None) -> dict[str, Any]:
        """Set (or clear with null) the caller's own money budgets in the platform currency; an
        admin may name another account (`user`: id, username or email). A budget left out is
        kept. Audited (`budget_changed`); gateways use the new limits within a second. The
        account as `me` shows it: `budget` and the effective `limits`."""
        caller = await self._authenticate(token)
        given = {n: v for n, v in (("spend_per_day", spend_per_day), ("spend_per_month", spend_per_month))
                 if v is not KEEP}
        if not given:
            raise InvalidParams("nothing to change: give spend_per_day or spend_per_month",
                                {"param": "spend_per_day"})
        budget = limits.check_limits(given, names=limits.BUDGET_NAMES)
        target = caller
        if user is not None:
            ref = user_ref(user)
            if not self._is_self(caller, ref):
                if not caller["is_admin"]:
                    raise Forbidden("only administrators may set another user's budget")
                target = await self.store.find_user(ref)
        updated = await self.store.set_budget(target["id"], budget, caller["id"])
        self.cache.evict(user_id=target["id"])  # here at once; other instances and gateways via the log
        log.info("budget set", user_id=target["id"], actor_id=caller["id"], fields=sorted(budget))
        return self._account_view(updated)

    # -- prices --------------------------------------------------------------------------

    @method(public=True)
    async def set_price(
        self, model: str, input: str | int, output: str | int, cached: str | int | None = None,
        currency: str = "USD", effective_from: str | None = None, token: str | None = None,
    ) -> dict[str, Any]:
        """A new version of a model's price per million tokens (decimal strings), from
        `effective_from` (ISO 8601 with an offset, not in the past; default now) on.

        Admins by their token; the operator (a member of the operator role) without one.
        Usage already stored keeps its cost.
        """
        actor_id = await self._admin_or_operator(token)
        row = await self._prices.set_price(
            money.check_model(model), money.check_price(input, "input"), money.check_price(output, "output"),
            None if cached is None else money.check_price(cached, "cached"), money.check_currency(currency),
            None if effective_from is None else money.check_moment(effective_from, "effective_from"),
            actor_id=actor_id, by="admin" if actor_id is not None else "operator",
        )
        log.info("price set", model=model, actor_id=actor_id, effective_from=row["effective_from"].isoformat())
        return money.price_view(row, row["now"])

    @method(public=True, idempotent=True)
    async def prices(self, token: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
        """Every model's price in force now and those scheduled, by model then time: anyone
        logged in (the operator without a token)."""
        await self._logged_in_or_operator(token)
        rows = await self._prices.prices(None if model is None else money.check_model(model))
        return [money.price_view(row, row["now"]) for row in rows]

    @method(idempotent=True, roles=("gateway",))
    async def price_table(self, since: int | None = None) -> dict[str, Any]:
        """Internal (gateways, for budgets and receipts): every model's price in force now and
        those scheduled, with `version` (grows with each price set); `prices` is None when
        `since` is that version already (nothing changed)."""
        if since is not None and not 0 <= since < 2**63:
            raise InvalidParams("since must be a version from a previous call", {"param": "since"})
        version = await self._prices.version()
        if since == version:
            return {"version": version, "prices": None}
        rows = await self._prices.prices(None)
        return {"version": version, "prices": [money.price_view(row, row["now"]) for row in rows]}

    # -- administration ----------------------------------------------------------------

    @method(public=True, idempotent=True)
    async def recent_usage(self, token: str, limit: int = 20) -> list[dict[str, Any]]:
        """The caller's latest requests (at most 100), newest first: for the dashboard."""
        user = await self._authenticate(token)
        if not 1 <= limit <= 100:
            raise InvalidParams("limit must be between 1 and 100", {"param": "limit"})
        rows = await self._usage.recent(user["id"], limit)
        return [{
            "created_at": iso(r["created_at"]), "model": r["model"], "key_name": r["key_name"],
            "key_prefix": r["key_prefix"], "prompt_tokens": r["prompt_tokens"],
            "completion_tokens": r["completion_tokens"], "cached": r["cached"],
            "latency_ms": r["latency_ms"], "status": r["status"],
        } for r in rows]


def _cost_totals(costs: list[asyncpg.Record]) -> dict[str, Any]:
    """`cost`: the sum per currency, as decimal strings; `unpriced`: requests without a price."""
    sums: dict[str, Any] = {}
    for c in costs:
        if c["currency"]:
            sums[c["currency"]] = sums.get(c["currency"], 0) + c["cost"]
    return {"cost": {cur: money.money(total) for cur, total in sorted(sums.items())},
            "unpriced": sum(c["unpriced"] for c in costs)}
