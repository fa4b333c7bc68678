"""`inferswarm budget`: your own money budgets, and the limits in force (`auth.me`, `auth.set_budget`).

    inferswarm budget                                    your budget and effective limits
    inferswarm budget set [--day AMOUNT|none] [--month AMOUNT|none] [--user U]   (--user: admins)

The limits in force are, per counter, the tighter of your tier's and your
budget (README of services/auth, "Per-key limits and budgets"); a key may have
tighter ones of its own (`keys edit --budget-month`). Over the mesh or, with
`--base-url`, the web service (`GET`/`PUT /api/budget`).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from inferswarm.commands import Result, Session, need_token
from inferswarm.credentials import Credentials
from services.auth.client import AuthClient, describe_limits

__all__ = ["BUDGET_COMMANDS"]


def _budget_text(account: Any) -> str:
    currency = account.get("currency", "")
    budget = account.get("budget") or {}
    own = ", ".join(f"{label} {budget.get(name) or 'none'}" for label, name in
                    (("day", "spend_per_day"), ("month", "spend_per_month")))
    return (f"{account['username']}: budget ({currency}) {own}\n"
            f"limits in force: {describe_limits(account.get('limits'), currency, none='no limits')}")


async def budget_show(args: Namespace, session: Session, creds: Credentials) -> Result:
    account = await AuthClient(session("auth")).me(token=need_token(creds))
    return Result(_budget_text(account), account)


async def budget_set(args: Namespace, session: Session, creds: Credentials) -> Result:
    user = None if args.user is None else int(args.user) if args.user.isascii() and args.user.isdigit() \
        else args.user
    account = await AuthClient(session("auth")).set_budget(
        token=need_token(creds), spend_per_day=args.spend_per_day, spend_per_month=args.spend_per_month, user=user)
    return Result("budget saved: gateways use it within a second\n" + _budget_text(account), account)


BUDGET_COMMANDS = {"budget": budget_show, "budget set": budget_set}
