"""Per-key limits and per-user money budgets: their checks, and the limits a caller gets.

A key may carry its own limits (`auth.create_key`/`auth.update_key` `limits`:
any of `LIMIT_NAMES`, null for none), and a user their own money budgets
(`auth.set_budget`: `spend_per_day`, `spend_per_month`). Gateways enforce every
counter of every scope of a caller (README.md, "Per-key limits and budgets"):

* the user scope: per counter the tighter (the smaller non-null) of the tier's
  limit and the user's own budget (`effective`);
* the key scope: the key's own limits, as they are. A key's limit may be larger
  than its user's: not refused, the tighter applies anyway, since both are enforced.

Counts are whole numbers 0..10^12; money is exact (`Decimal` here, NUMERIC(18,6)
in PostgreSQL), a decimal string or a whole number 0..10^9 with at most 6
decimals, never a float, and on the wire a decimal string with at least 2
decimals ("1.50"), in the platform currency (`INFERSWARM_CURRENCY`). Every
refusal is `INVALID_PARAMS` naming the limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from shared.errors import InvalidParams
from shared.tiers import BUDGET_NAMES, COUNT_NAMES, LIMIT_NAMES, money_text  # one list for auth, clients, gateways
from services.auth.prices import check_amount

__all__ = ["BUDGET_NAMES", "COUNT_NAMES", "LIMIT_NAMES", "MAX_COUNT", "MAX_MONEY", "MONEY_PLACES",
           "check_count", "check_limit", "check_limits", "check_money", "effective", "limits_of", "money_text"]

MAX_COUNT = 10**12
MAX_MONEY = 10**9
MONEY_PLACES = 6  #: NUMERIC(18,6)


def check_count(value: Any, param: str) -> int:
    """A whole number 0..10^12 (not a bool, not a string)."""
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise InvalidParams(f"{param} must be a whole number from 0 to {MAX_COUNT}, or null for no limit",
                            {"param": param})
    return value


def check_money(value: Any, param: str) -> Decimal:
    """An amount 0..10^9, at most 6 decimals, as a decimal string or a whole number; never a float
    (0.1 is not exact in binary): the prices' rule (prices.py `check_amount`)."""
    return check_amount(value, param, maximum=Decimal(MAX_MONEY))


def check_limit(name: str, value: Any) -> int | Decimal | None:
    """One limit's value: null clears it; a count or an amount as its name says."""
    if value is None:
        return None
    return check_money(value, name) if name in BUDGET_NAMES else check_count(value, name)


def check_limits(value: Any, param: str = "limits", names: tuple[str, ...] = LIMIT_NAMES
                 ) -> dict[str, int | Decimal | None]:
    """A map of some of `names` to their values (null: no limit); an unknown name is refused by name."""
    if not isinstance(value, Mapping):
        raise InvalidParams(f"{param} must be a map of {', '.join(names)} to values (null: no limit)",
                            {"param": param})
    for name in value:
        if name not in names:
            shown = str(name)[:64]
            raise InvalidParams(f"{param}: unknown limit {shown!r} (known: {', '.join(names)})",
                                {"param": shown})
    return {name: check_limit(name, value[name]) for name in names if name in value}


def limits_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The five limits of a row (a key's, or a user's budget), money as strings; a name the row
    lacks (a user has no counts of their own) is None."""
    view: dict[str, Any] = {}
    for name in LIMIT_NAMES:
        value = row[name] if name in row.keys() else None
        view[name] = money_text(value) if name in BUDGET_NAMES else value
    return view


def effective(tier: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """Per counter, the tighter of the tier's limit and the user's own (the smaller non-null)."""
    view: dict[str, Any] = {}
    for name in LIMIT_NAMES:
        values = [v for v in (tier.get(name), own.get(name)) if v is not None]
        if name in BUDGET_NAMES:
            view[name] = money_text(min((Decimal(str(v)) for v in values), default=None))
        else:
            view[name] = min((int(v) for v in values), default=None)
    return view
