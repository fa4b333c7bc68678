"""`inferswarm webhook ...` and `inferswarm alerts`: spending alerts and the webhook that carries them.

    inferswarm webhook set URL [--thresholds 50,80,100]   create it (the signing secret is printed once),
                                                          or change its URL and thresholds
    inferswarm webhook show | rotate-secret | remove
    inferswarm webhook deliveries [--limit N] [--before-id N]   the delivery log, newest first
    inferswarm alerts [--limit N]                         your latest spending alerts

With the saved session, over the mesh or, with `--base-url`, the web
service's /api/webhook and /api/alerts (services/auth/README.md, "Spending
alerts and webhooks").
"""

from __future__ import annotations

import argparse
from argparse import Namespace
from collections.abc import Callable
from typing import Any

from inferswarm.commands import Result, Session, need_token, table
from inferswarm.credentials import Credentials
from services.auth.client import AuthClient

__all__ = ["WEBHOOK_COMMANDS", "add_webhook_parsers", "thresholds"]


def thresholds(text: str) -> list[int]:
    """`50,80,100`: whole percentages (auth checks their range)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        raise argparse.ArgumentTypeError("expected whole percentages separated by commas, e.g. 50,80,100")
    return [int(p) for p in parts]


def _describe(hook: Any) -> str:
    text = f"webhook: {hook['url']}\nthresholds: {', '.join(f'{t}%' for t in hook['thresholds'])}"
    if hook.get("secret"):
        text += (f"\nsigning secret: {hook['secret']}\n"
                 "  shown once: keep it where your receiver verifies x-inferswarm-signature")
    return text


async def webhook_set(args: Namespace, session: Session, creds: Credentials) -> Result:
    hook = await AuthClient(session("auth")).set_webhook(token=need_token(creds), url=args.url,
                                                        thresholds=args.thresholds)
    return Result(_describe(hook), hook)


async def webhook_show(args: Namespace, session: Session, creds: Credentials) -> Result:
    hook = await AuthClient(session("auth")).webhook(token=need_token(creds))
    return Result(_describe(hook), hook)


async def webhook_rotate(args: Namespace, session: Session, creds: Credentials) -> Result:
    hook = await AuthClient(session("auth")).rotate_webhook_secret(token=need_token(creds))
    return Result(_describe(hook) + "\nthe old secret signs nothing from now on", hook)


async def webhook_remove(args: Namespace, session: Session, creds: Credentials) -> Result:
    answer = await AuthClient(session("auth")).remove_webhook(token=need_token(creds))
    return Result("webhook removed" if answer["removed"] else "no webhook to remove", answer)


async def webhook_deliveries(args: Namespace, session: Session, creds: Credentials) -> Result:
    page = await AuthClient(session("auth")).webhook_deliveries(token=need_token(creds), limit=args.limit,
                                                               before_id=args.before_id)
    rows = [[d["id"], d["at"], d["event_id"], d["attempt"], d["status_code"] or d["error"], f"{d['duration_ms']} ms",
             d["next_attempt_at"] or "-", d["status"]] for d in page["deliveries"]]
    text = table(["id", "at", "event", "attempt", "answer", "took", "next attempt", "delivery"], rows) \
        if rows else "no deliveries"
    if page["next_before_id"] is not None:
        text += f"\nolder attempts: add --before-id {page['next_before_id']}"
    return Result(text, page)


async def alerts(args: Namespace, session: Session, creds: Credentials) -> Result:
    answer = await AuthClient(session("auth")).alerts(token=need_token(creds), limit=args.limit)
    rows = [[a["created_at"], f"{a['scope']} {a['id']}", a["counter"], f"{a['threshold']}%",
             f"{a['spent']} of {a['budget']} {a['currency']}", a["period_start"]] for a in answer["alerts"]]
    text = table(["at", "budget of", "counter", "reached", "spent", "period"], rows) if rows else "no alerts"
    return Result(text, answer)


def add_webhook_parsers(client: Callable[..., argparse.ArgumentParser],
                        commands: argparse._SubParsersAction) -> None:
    """`webhook ...` and `alerts` on the root's subcommands, each made by cli.py's `client`."""
    hooks = commands.add_parser("webhook", help="the webhook that receives your spending alerts").add_subparsers(
        dest="webhook_command", required=True, metavar="ACTION")
    set_hook = client("webhook set", "create your webhook (its secret is shown once) or change it", hooks)
    set_hook.add_argument("url", help="https://... (a public address)")
    set_hook.add_argument("--thresholds", type=thresholds, metavar="50,80,100",
                          help="percentages of each budget that raise an alert, 1 to 5 of 1-100 "
                               "(default: 50,80,100; left out on a change: kept)")
    client("webhook show", "your webhook's URL and thresholds (never its secret)", hooks)
    client("webhook rotate-secret", "a new signing secret (shown once); the old one stops at once", hooks)
    client("webhook remove", "delete your webhook", hooks)
    log = client("webhook deliveries", "the delivery log: each attempt, newest first", hooks)
    log.add_argument("--limit", type=int, metavar="N", help="at most N attempts, 1-500 (default: 50)")
    log.add_argument("--before-id", type=int, metavar="N", help="older than attempt N: the next page")
    recent = client("alerts", "your latest spending alerts (a budget's 50, 80, 100 % reached)")
    recent.add_argument("--limit", type=int, metavar="N", help="at most N alerts, 1-100 (default: 20)")


WEBHOOK_COMMANDS = {"webhook set": webhook_set, "webhook show": webhook_show,
                    "webhook rotate-secret": webhook_rotate, "webhook remove": webhook_remove,
                    "webhook deliveries": webhook_deliveries, "alerts": alerts}
