"""The names of a scope's limits, and how people read them (the CLI's `keys list`, the dashboard).

One list for auth (services/auth/limits.py checks them), its clients and the
gateways: counts are whole numbers, money a decimal string in the platform
currency ("1.50"); None is "no limit".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.tiers import BUDGET_NAMES, COUNT_NAMES, LIMIT_NAMES  # the contract's one list

__all__ = ["BUDGET_NAMES", "COUNT_NAMES", "LIMIT_NAMES", "describe_limits"]


#: Each limit's short form, after its value.
_SHORT = {"requests_per_hour": "req/h", "requests_per_month": "req/mo", "tokens_per_month": "tok/mo",
          "spend_per_day": "/day", "spend_per_month": "/mo"}


def describe_limits(limits: Mapping[str, Any] | None, currency: str = "", none: str = "none") -> str:
    """The limits set, compactly: "5 req/h, 1000 tok/mo, 1.00/mo"; `none` when there are none."""
    parts = []
    for name in LIMIT_NAMES:
        value = (limits or {}).get(name)
        if value is None:
            continue
        if name in BUDGET_NAMES:
            parts.append(f"{value}{' ' + currency if currency else ''}{_SHORT[name]}")
        else:
            parts.append(f"{value} {_SHORT[name]}")
    return ", ".join(parts) or none
