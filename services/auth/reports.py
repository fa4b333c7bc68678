"""Cost and usage reports (`auth.report`, `auth.top_spenders`): what is asked, and the rows answered.

The SQL is in usage_store.py (`report`, `top_spenders`), over the daily table
`usage_daily_costs`; here the parameters are checked (every refusal names its
field) and the rows it returns, one per currency, are folded into one row per
period (and model or key), with `cost` as `{currency: "decimal string"}`:
currencies are never added together, and sums are never rounded again.

A period is named by its first day (ISO 8601, UTC): the day itself, the Monday
of its ISO week, or the first of its month. The first and last periods of a
range may be partial: only the days from `start` to `end` count.

**Organisations.** A report covers a list of users (`UsageStore.report(user_ids,
...)`) and, for an organisation's (`auth.org_report`, org_methods.py), only the
usage attributed to it (its keys'): every member's for its owners and admins,
a plain member's own; `by` may then be "member" too (`ORG_BY`).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from shared.errors import InvalidParams
from services.auth.prices import money

__all__ = ["PERIODS", "BY", "ORG_BY", "MAX_DAYS", "MAX_SPENDERS", "day_range", "check_period", "check_by",
           "check_limit", "report_rows", "report_totals", "spender_rows"]

PERIODS = ("day", "week", "month")
BY = ("model", "key")  #: a user's report
ORG_BY = ("member", "model", "key")  #: an organisation's
MAX_DAYS = 366  #: the longest range, in days, both ends included
DEFAULT_DAYS = 30
MAX_SPENDERS = 100


def _parse_day(text: str, param: str) -> date:
    try:
        if not isinstance(text, str) or len(text) != 10:
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidParams(f"{param} must be a date as YYYY-MM-DD", {"param": param}) from None


def day_range(start: str | None, end: str | None) -> tuple[date, date]:
    """UTC days `start` to `end`, both included: by default the last 30 days to today; at most 366."""
    last = _parse_day(end, "end") if end is not None else datetime.now(timezone.utc).date()
    first = _parse_day(start, "start") if start is not None else last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise InvalidParams("start must not be after end", {"param": "start"})
    if (last - first).days >= MAX_DAYS:
        raise InvalidParams(f"start and end may be at most {MAX_DAYS} days apart, both included",
                            {"param": "start"})
    return first, last


def check_period(group_by: str) -> str:
    if group_by not in PERIODS:
        raise InvalidParams("group_by must be day, week or month", {"param": "group_by"})
    return group_by


def check_by(by: str | None, allowed: tuple[str, ...] = BY) -> str | None:
    if by is not None and by not in allowed:
        raise InvalidParams(f"by must be {', '.join(allowed[:-1])} or {allowed[-1]} (or absent: all together)",
                            {"param": "by"})
    return by


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_SPENDERS:
        raise InvalidParams(f"limit must be 1-{MAX_SPENDERS}", {"param": "limit"})
    return limit


def report_rows(records: list[Any], by: str | None) -> list[dict[str, Any]]:
    """One row per period (and model, key or member), the currencies' rows folded together, in SQL's order."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    sums: dict[tuple[Any, ...], dict[str, Decimal]] = {}
    for r in records:
        group = (r["period"], r["model"], r["key_id"], r["user_id"])
        row = rows.get(group)
        if row is None:
            row = rows[group] = {"period": r["period"].isoformat()}
            if by == "model":
                row["model"] = r["model"]
            elif by == "key":
                row.update(key_id=r["key_id"], key_name=r["key_name"])
            elif by == "member":
                row.update(user_id=r["user_id"], username=r["username"])
            row.update(requests=0, prompt_tokens=0, completion_tokens=0, cost={}, unpriced=0)
            sums[group] = {}
        for field in ("requests", "prompt_tokens", "completion_tokens", "unpriced"):
            row[field] += int(r[field])
        if r["currency"]:
            sums[group][r["currency"]] = r["cost"]
    for group, row in rows.items():
        row["cost"] = {currency: money(total) for currency, total in sorted(sums[group].items())}
    return list(rows.values())


def report_totals(records: list[Any]) -> dict[str, Any]:
    """The whole range: requests, tokens, cost per currency, unpriced requests."""
    totals: dict[str, Any] = {f: sum(int(r[f]) for r in records)
                              for f in ("requests", "prompt_tokens", "completion_tokens", "unpriced")}
    sums: dict[str, Decimal] = {}
    for r in records:
        if r["currency"]:
            sums[r["currency"]] = sums.get(r["currency"], Decimal(0)) + r["cost"]
    totals["cost"] = {currency: money(total) for currency, total in sorted(sums.items())}
    return totals


def spender_rows(records: list[Any]) -> list[dict[str, Any]]:
    """Ranked users per currency; `currency` and `cost` None for the requests without a price."""
    return [{
        "currency": r["currency"] or None, "rank": r["rank"], "user_id": r["user_id"], "username": r["username"],
        "cost": money(r["cost"]) if r["currency"] else None, "requests": int(r["requests"]),
        "prompt_tokens": int(r["prompt_tokens"]), "completion_tokens": int(r["completion_tokens"]),
        "unpriced": int(r["unpriced"]),
    } for r in records]
