"""Per-key limits and budgets on the command line: the options (`keys create|edit`, `budget set`).

    inferswarm keys create NAME [--requests-per-hour N] [--requests-per-month N] [--tokens-per-month N]
                                [--budget-day AMOUNT] [--budget-month AMOUNT]
    inferswarm keys edit KEY_ID [the same; the value `none` clears one]
    inferswarm budget set [--day AMOUNT|none] [--month AMOUNT|none] [--user U]   (budget.py)

Amounts are in the platform currency, written as decimals ("1.50"), never
read through a float: auth gets the text and checks it (at most 6 decimals, up
to 10^9). An option left out is kept (`edit`, `budget set`); `none` clears.
Bad input is one line and exit code 2 (argparse) or auth's INVALID_PARAMS.
"""

from __future__ import annotations

import argparse
import re
from argparse import ArgumentTypeError, Namespace
from typing import Any

from services.auth.client import KEEP

__all__ = ["add_limit_options", "add_budget_options", "limit_changes"]

_AMOUNT = re.compile(r"\d+(\.\d+)?")
#: (option, limit name, argument type's kind, help)
_OPTIONS = (("--requests-per-hour", "requests_per_hour", "count", "requests an hour with this key"),
            ("--requests-per-month", "requests_per_month", "count", "requests a calendar month (UTC)"),
            ("--tokens-per-month", "tokens_per_month", "count", "prompt and completion tokens a month"),
            ("--budget-day", "spend_per_day", "amount", "money a UTC day, e.g. 1.50 (the platform currency)"),
            ("--budget-month", "spend_per_month", "amount", "money a calendar month, e.g. 10"))


def _value(kind: str, clearing: bool) -> Any:
    """An argument type: a count or an amount, or (`clearing`) `none` for None."""
    def parse(text: str) -> int | str | None:
        text = text.strip()
        if clearing and text.lower() == "none":
            return None
        if kind == "count" and text.isascii() and text.isdigit():
            return int(text)
        if kind == "amount" and _AMOUNT.fullmatch(text):
            return text
        what = "a whole number" if kind == "count" else "an amount such as 1.50"
        raise ArgumentTypeError(f"{text!r}: expected {what}{' or none' if clearing else ''}")
    parse.__name__ = kind  # argparse names the type in its message
    return parse


def add_limit_options(parser: argparse.ArgumentParser, *, clearing: bool) -> None:
    """The five limit options of `keys create` (`clearing` False) or `keys edit` (`none` clears)."""
    group = parser.add_argument_group("limits of this key (the tighter of these and your account's applies)")
    for option, name, kind, help in _OPTIONS:
        metavar = "N" if kind == "count" else "AMOUNT"
        group.add_argument(option, dest=name, type=_value(kind, clearing), default=argparse.SUPPRESS,
                           metavar=metavar + ("|none" if clearing else ""), help=help)


def limit_changes(args: Namespace) -> dict[str, Any]:
    """The limits given on the command line (absent options are not there: kept)."""
    return {name: getattr(args, name) for _, name, _, _ in _OPTIONS if hasattr(args, name)}


def add_budget_options(parser: argparse.ArgumentParser) -> None:
    amount = _value("amount", clearing=True)
    parser.add_argument("--day", dest="spend_per_day", type=amount, default=KEEP, metavar="AMOUNT|none",
                        help="the most to spend a UTC day (none: no budget of your own)")
    parser.add_argument("--month", dest="spend_per_month", type=amount, default=KEEP, metavar="AMOUNT|none",
                        help="the most to spend a calendar month")
    parser.add_argument("--user", metavar="U", help="someone else's (an id, username or email; admins only)")
