"""Checking what an operator or admin types for a price (`auth.set_price`), and money on the wire.

Money is `decimal.Decimal` here and NUMERIC in PostgreSQL, never a float; on
the wire (msgpack, JSON) it is a decimal string such as "0.150000", since
neither has a decimal type. A price is per million tokens: a decimal string
(or a whole number) from 0 to 999999.999999, at most 6 decimals; anything
else, a float included (0.1 is not exact in binary), is `INVALID_PARAMS`
naming the parameter.

Cost of a usage record (computed in SQL as each record is stored,
usage_store.py)::

    cost = (prompt_tokens * p + completion_tokens * output) / 1 000 000

where p is the cached price for a cached answer when the model has one, else
the input price; rounded half to even to 10 decimals (`COST_PLACES`, the
migration's `round_half_even`); NULL when the model had no price at the
record's time. `cost_of` (shared/pricing.py) is the same rule in Python, the
gateways' for budgets and receipts.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Any

from shared.errors import InvalidParams
from shared.pricing import COST_PLACES, cost_of  # the one rule (the SQL applies it too)

__all__ = ["COST_PLACES", "PRICE_PLACES", "check_amount", "check_model", "check_price", "check_currency", "check_moment",
           "cost_of", "money", "price_view"]

PRICE_PLACES = 6  #: decimals of a price per million tokens (NUMERIC(12,6))
_AMOUNT = re.compile(r"([0-9]{1,13})(?:\.([0-9]{1,30}))?")  # ASCII digits only, unlike \d
_MAX_PRICE = Decimal("999999.999999")
_CURRENCY = re.compile(r"[A-Z]{3}")
#: The names a worker's catalog accepts (services/inference/catalog.py).
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}")


def check_model(model: str) -> str:
    """A model name as catalogs write them: a letter or digit, then letters, digits and ._:/+-."""
    if not _MODEL.fullmatch(model):
        raise InvalidParams("model must be a model name: a letter or digit, then up to 63 letters, "
                            "digits or ._:/+-", {"param": "model"})
    return model


def check_price(value: str | int, param: str) -> Decimal:
    """A price per million tokens: exact, 0 to 999999.999999, at most `PRICE_PLACES` decimals."""
    return check_amount(value, param, maximum=_MAX_PRICE)


def check_amount(value: str | int, param: str, *, maximum: Decimal) -> Decimal:
    """Money as typed (a price, a tier's budget): a decimal string or a whole number, exact,
    0 to `maximum`, at most `PRICE_PLACES` decimals; a float is refused (0.1 is not exact)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidParams(f"{param} must be a decimal string such as \"0.15\" (a float is not exact)",
                            {"param": param})
    text = str(value)
    match = _AMOUNT.fullmatch(text)
    if match is None or Decimal(text) > maximum:
        raise InvalidParams(f"{param} must be an amount from 0 to {maximum}, a decimal string "
                            f"such as \"0.15\"", {"param": param})
    if match[2] is not None and len(match[2]) > PRICE_PLACES:
        raise InvalidParams(f"{param} has more than {PRICE_PLACES} decimals", {"param": param})
    return Decimal(text)


def check_currency(currency: str) -> str:
    """An ISO 4217 code: three capital letters."""
    if not _CURRENCY.fullmatch(currency):
        raise InvalidParams("currency must be an ISO 4217 code such as USD", {"param": "currency"})
    return currency


def check_moment(text: str, param: str) -> datetime:
    """An ISO 8601 date and time with its offset (e.g. 2026-01-01T00:00:00Z)."""
    try:
        if len(text) > 40:
            raise ValueError(text)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidParams(f"{param} must be an ISO 8601 date and time, e.g. 2026-01-01T00:00:00Z",
                            {"param": param}) from None
    if moment.tzinfo is None:
        raise InvalidParams(f"{param} needs a time zone, e.g. 2026-01-01T00:00:00Z", {"param": param})
    return moment




def money(value: Decimal | None) -> str | None:
    """A NUMERIC as the wire carries it: its decimal string ("0.1500000000"), or None."""
    return None if value is None else format(value, "f")


def price_view(row: Any, now: datetime) -> dict[str, Any]:
    """A `model_prices` row for the wire: money as strings, moments as ISO 8601."""
    return {
        "model": row["model"], "input": money(row["input_price"]), "output": money(row["output_price"]),
        "cached": money(row["cached_price"]), "currency": row["currency"],
        "effective_from": row["effective_from"].isoformat(),
        "status": "scheduled" if row["effective_from"] > now else "current",
        "created_at": row["created_at"].isoformat(),
    }
