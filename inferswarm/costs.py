"""`inferswarm costs` and `inferswarm admin top-spenders`: cost reports (`auth.report`, `auth.top_spenders`).

    inferswarm costs [--from DATE] [--to DATE] [--by model|key] [--group day|week|month] [--csv] [--json]
    inferswarm admin top-spenders [--from DATE] [--to DATE] [--limit N]

`costs` is the logged-in user's own usage, a table by default; `--csv` prints
the same file `GET /api/reports.csv` gives (shared/report_csv.py: a header
line, money as exact decimals, formula-like cells prefixed with `'`); `--json`
the answer as it is. Over the mesh, or the web service with `--base-url`.
`admin top-spenders` runs as the operator when the mesh secret is at hand,
else with the saved session of an administrator.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from inferswarm.commands import Result, Session, need_token, table
from inferswarm.credentials import Credentials
from services.auth.client import AuthClient
from shared.report_csv import report_csv

__all__ = ["COST_COMMANDS", "costs", "admin_top_spenders", "money_text", "report_result"]


def money_text(cost: dict[str, str] | None) -> str:
    """`{"USD": "0.0012"}` as "0.0012 USD" (currencies apart, never added), "-" for none."""
    return ", ".join(f"{amount} {currency}" for currency, amount in sorted((cost or {}).items())) or "-"


async def costs(args: Namespace, session: Session, creds: Credentials) -> Result:
    report = await AuthClient(session("auth")).report(token=need_token(creds), start=args.start, end=args.end,
                                                      group_by=args.group, by=args.by)
    return report_result(report, csv=args.csv)


def report_result(report: Any, *, csv: bool) -> Result:
    """A report (`auth.report`, `auth.org_report`) as a table with its totals, or as CSV."""
    if csv:
        return Result(report_csv(report).rstrip("\r\n"), report)
    by = report["by"]
    headers = ["period", *([by] if by else []), "requests", "prompt tokens", "completion tokens", "cost",
               "unpriced"]
    rows: list[list[Any]] = []
    for row in report["rows"]:
        named = {"model": [row.get("model")], "key": [_key(row)], "member": [row.get("username")]}.get(by, [])
        rows.append([row["period"], *named, row["requests"], row["prompt_tokens"], row["completion_tokens"],
                     money_text(row["cost"]), row["unpriced"]])
    totals = report["totals"]
    text = table(headers, rows) + (
        f"\n{report['start']} to {report['end']}: {totals['requests']} requests, "
        f"{totals['prompt_tokens'] + totals['completion_tokens']} tokens, {money_text(totals['cost'])}")
    if totals["unpriced"]:
        text += f" ({totals['unpriced']} requests without a price)"
    return Result(text, report)


def _key(row: Any) -> str:
    if row.get("key_id") is None:
        return "(no key)"
    return row.get("key_name") or f"(deleted key {row['key_id']})"


async def admin_top_spenders(args: Namespace, session: Session, creds: Credentials) -> Result:
    """As the operator (the mesh secret), else as the logged-in admin."""
    token = None if getattr(args, "as_operator", False) else need_token(creds)
    answer = await AuthClient(session("auth")).top_spenders(token=token, start=args.start, end=args.end,
                                                            limit=args.limit)
    rows = [[s["currency"] or "(no price)", s["rank"], s["username"], s["user_id"], s["cost"] or "-",
             s["requests"], s["prompt_tokens"] + s["completion_tokens"]] for s in answer["spenders"]]
    text = table(["currency", "rank", "user", "id", "cost", "requests", "tokens"], rows)
    return Result(f"{text}\n{answer['start']} to {answer['end']}", answer)


COST_COMMANDS = {"costs": costs, "admin top-spenders": admin_top_spenders}
