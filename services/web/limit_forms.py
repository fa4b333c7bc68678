"""The dashboard's limit fields: a key's five (create, edit) and the account's budget (two).

A field left empty is "no limit" (the tier's and the account's still apply).
Counts are checked here (a whole number, or empty) so a typo is shown beside
its field without a round trip; amounts go to auth as typed, never through a
float, and auth's refusal names the field (`session.field_errors`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.auth.client import BUDGET_NAMES, COUNT_NAMES, LIMIT_NAMES
from services.web.forms import text

__all__ = ["BUDGET_FIELDS", "LIMIT_FIELDS", "form_values", "shown_values", "limit_params"]

_LABELS = {"requests_per_hour": "Requests an hour", "requests_per_month": "Requests a month",
           "tokens_per_month": "Tokens a month", "spend_per_day": "Spend a day", "spend_per_month": "Spend a month"}
#: (field name, label, input mode) of a key's limits, and of the account's budget.
LIMIT_FIELDS = tuple((name, _LABELS[name], "numeric" if name in COUNT_NAMES else "decimal") for name in LIMIT_NAMES)
BUDGET_FIELDS = tuple(field for field in LIMIT_FIELDS if field[0] in BUDGET_NAMES)


def form_values(form: Mapping[str, Any], names: tuple[str, ...] = LIMIT_NAMES) -> dict[str, str]:
    return {name: text(form, name) for name in names}


def shown_values(limits: Mapping[str, Any] | None, names: tuple[str, ...] = LIMIT_NAMES) -> dict[str, str]:
    """The fields as the limits are now: '' for none."""
    return {name: "" if (limits or {}).get(name) is None else str(limits[name]) for name in names}  # type: ignore[index]


def limit_params(values: Mapping[str, str], before: Mapping[str, str] | None = None,
                 names: tuple[str, ...] = LIMIT_NAMES) -> tuple[dict[str, Any], dict[str, str]]:
    """What to send auth -- each field (changed from `before`, when given; '' is None: none) -- and
    the fields refused here."""
    params: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in names:
        value = values.get(name, "")
        if before is not None and value == before.get(name, ""):
            continue
        if not value:
            params[name] = None
        elif name not in COUNT_NAMES:
            params[name] = value
        elif value.isascii() and value.isdigit():
            params[name] = int(value)
        else:
            errors[name] = "Enter a whole number, or leave it empty for no limit"
    return params, errors
