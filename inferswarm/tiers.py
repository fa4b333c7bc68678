"""`inferswarm admin tiers` and `inferswarm admin tiers set`: the tiers' limits (`auth.tiers`,
`auth.set_tier_limits`).

    inferswarm admin tiers                                        # a table of every tier
    inferswarm admin tiers set free --requests-per-month 1000 --budget-day 5 [--priority 0]

Like `admin price`, they run as the operator when the mesh secret is at hand,
else with the saved session (an administrator's, for `set`). `none` is "no
limit"; a limit left out is kept. Amounts (the budgets) are sent as typed, for
auth to check: exact decimals, never through a float.
"""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any

from inferswarm.commands import Result, Session, need_token, table
from inferswarm.credentials import Credentials
from services.auth.client import AuthClient, TierInfo
from shared.errors import InvalidParams

__all__ = ["TIER_COMMANDS", "SET_OPTIONS", "add_limit_options", "add_set_arguments", "admin_tiers", "admin_tiers_set", "limit_value", "shown"]

#: `set`'s options: (option, the limit it sets, whether it is money, what the table calls it).
SET_OPTIONS = (
    ("--requests-per-hour", "requests_per_hour", False, "requests/hour"),
    ("--requests-per-month", "requests_per_month", False, "requests/month"),
    ("--tokens-per-month", "tokens_per_month", False, "tokens/month"),
    ("--budget-day", "spend_per_day", True, "budget/day"),
    ("--budget-month", "spend_per_month", True, "budget/month"),
)


def add_set_arguments(command: ArgumentParser) -> None:
    command.add_argument("name", help="the tier: free, pro, enterprise or unlimited")
    add_limit_options(command)
    command.add_argument("--priority", type=int, metavar="P", help="0-9: a higher one is served first (left out: kept)")


def add_limit_options(command: ArgumentParser) -> None:
    """The five limits' options (a tier's, an organisation's: orgs.py)."""
    for option, limit, is_money, _ in SET_OPTIONS:
        command.add_argument(option, dest=limit, metavar="AMOUNT|none" if is_money else "N|none",
                             help=f"{'an amount, e.g. 5.50' if is_money else 'a whole number'}, or none for "
                                  f"no limit (left out: kept)")


async def admin_tiers(args: Namespace, session: Session, creds: Credentials) -> Result:
    token = None if args.as_operator else need_token(creds)
    tiers = await AuthClient(session("auth")).tiers(token=token)
    return Result(_table(tiers), tiers)


async def admin_tiers_set(args: Namespace, session: Session, creds: Credentials) -> Result:
    """As the operator (the mesh secret), else as the logged-in admin."""
    token = None if args.as_operator else need_token(creds)
    limits = {limit: limit_value(getattr(args, limit), limit, is_money) for _, limit, is_money, _ in SET_OPTIONS
              if getattr(args, limit) is not None}
    tier = await AuthClient(session("auth")).set_tier_limits(name=args.name, limits=limits, priority=args.priority,
                                                             token=token)
    return Result(f"{tier['name']}: set; every gateway applies it within a second\n{_table([tier])}", tier)


def limit_value(text: str, limit: str, is_money: bool) -> int | str | None:
    """What was typed: "none" is no limit; money as its text (auth checks it), counts as integers."""
    if text.strip().lower() == "none":
        return None
    if is_money:
        return text.strip()
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise InvalidParams(f"{limit} must be a whole number or none, not {text[:40]!r}", {"param": limit}) from None


def _table(tiers: list[TierInfo]) -> str:
    rows: list[list[Any]] = [
        [t["name"], *(shown(t["limits"][limit]) for _, limit, _, _ in SET_OPTIONS), t["priority"],
         "edited" if t["edited"] else "default"] for t in tiers]
    return table(["tier", *(header for *_, header in SET_OPTIONS), "priority", "values"], rows)


def shown(value: int | str | None) -> str:
    return "none" if value is None else f"{value:,}" if isinstance(value, int) else value


TIER_COMMANDS = {"admin tiers": admin_tiers, "admin tiers set": admin_tiers_set}
