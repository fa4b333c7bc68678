"""Cost reports for people: CSV files, per-model and per-key totals, and chart series.

`auth.report` answers rows of one period (and model or key) with `cost` as
`{currency: "decimal string"}`. Here they become:

* a CSV download (`csv_response`; the file itself is shared/report_csv.py's,
  which the CLI's `costs --csv` writes too);
* totals per model or key over the whole range (`fold`), summed as Decimals;
* chart series with every period of the range, zeros included (`series`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from aiohttp import web

from shared.report_csv import report_csv

__all__ = ["csv_response", "fold", "period_starts", "series"]

_FIGURES = ("requests", "prompt_tokens", "completion_tokens", "unpriced")


def csv_response(report: Mapping[str, Any]) -> web.Response:
    """A download (`Content-Disposition: attachment`) named after the report's range and grouping."""
    by = f"-by-{report['by']}" if report.get("by") else ""
    name = f"inferswarm-costs-{report['start']}-{report['end']}-{report['group_by']}{by}.csv"
    return web.Response(body=report_csv(report).encode(), content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"',
                                 "Cache-Control": "no-store"})


def fold(rows: Iterable[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    """Rows summed over their periods, one per `key` ("model", or "key_id" with its name), most
    requests first."""
    folded: dict[Any, dict[str, Any]] = {}
    for row in rows:
        entry = folded.setdefault(row.get(key), {
            "model": row.get("model"), "key_id": row.get("key_id"), "key_name": row.get("key_name"),
            **dict.fromkeys(_FIGURES, 0), "cost": {}})
        for name in _FIGURES:
            entry[name] += int(row.get(name) or 0)
        for currency, amount in (row.get("cost") or {}).items():
            entry["cost"][currency] = entry["cost"].get(currency, Decimal(0)) + Decimal(amount)
    ordered = sorted(folded.values(), key=lambda e: (-e["requests"], str(e[key])))
    for entry in ordered:
        entry["cost"] = {c: format(v, "f") for c, v in sorted(entry["cost"].items())}
    return ordered


def period_starts(first: date, last: date, group_by: str) -> list[date]:
    """The first day of every period (day, ISO week, month) that meets `first`..`last`."""
    if group_by == "week":
        start, step = first - timedelta(days=first.weekday()), timedelta(days=7)
    elif group_by == "month":
        start, step = first.replace(day=1), None
    else:
        start, step = first, timedelta(days=1)
    starts = []
    while start <= last:
        starts.append(start)
        if step is None:
            start = date(start.year + start.month // 12, start.month % 12 + 1, 1)
        else:
            start += step
    return starts


def series(report: Mapping[str, Any], currency: str | None) -> list[dict[str, Any]]:
    """Per period of the range (its rows summed, whatever `by`): `value` (the cost in `currency` as a
    float, for the chart's geometry only, or the requests when None) and its exact `label`."""
    first, last = date.fromisoformat(report["start"]), date.fromisoformat(report["end"])
    requests: dict[str, int] = {}
    costs: dict[str, Decimal] = {}
    for row in report.get("rows", []):
        period = row["period"]
        requests[period] = requests.get(period, 0) + int(row.get("requests") or 0)
        amount = (row.get("cost") or {}).get(currency) if currency else None
        if amount is not None:
            costs[period] = costs.get(period, Decimal(0)) + Decimal(amount)
    points = []
    for start in period_starts(first, last, report["group_by"]):
        day = start.isoformat()
        if currency is None:
            value: float = requests.get(day, 0)
            label = f"{requests.get(day, 0):,} requests"
        else:
            total = costs.get(day, Decimal(0))
            value, label = float(total), f"{format(total, 'f')} {currency}"
        points.append({"day": day, "value": value, "label": f"{day}: {label}"})
    return points
