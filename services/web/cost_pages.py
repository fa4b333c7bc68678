"""The Costs page (`GET /costs`) and its CSV download (`GET /costs.csv`), for a logged-in browser.

The page asks `auth.report` three times at once: per period (the charts: cost
per currency and requests, one bar per day, ISO week or month), and by model
and by key over the same range (the tables, summed over the periods). The
range and grouping come from the query (`start`, `end`, `group`), through a
GET form; a value auth refuses is shown on the page with the field it names.
The CSV link carries the same query; like every page it reads the session
cookie (a GET that changes nothing; the cookie is SameSite=Strict).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from shared.errors import InvalidParams, MeshError
from services.web.report_views import csv_response, fold, series
from services.web.session import TOKEN, UPSTREAM, login_required
from services.web.views import bar_chart, render

__all__ = ["routes", "GROUPS", "BY", "report_charts", "report_query"]

routes = web.RouteTableDef()

GROUPS = ("day", "week", "month")
BY = ("model", "key")


def report_query(request: web.Request) -> dict[str, Any]:
    """The report's parameters as the page's query gives them (empty means the default)."""
    return {"start": request.query.get("start") or None, "end": request.query.get("end") or None,
            "group_by": request.query.get("group") or "day"}


@routes.get("/costs")
@login_required
async def costs_page(request: web.Request) -> web.Response:
    auth, token, params = request.app[UPSTREAM].auth, request[TOKEN], report_query(request)
    try:
        report, by_model, by_key = await asyncio.gather(
            auth.report(token=token, **params), auth.report(token=token, **params, by="model"),
            auth.report(token=token, **params, by="key"))
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED":
            raise
        field = exc.data.get("param") if isinstance(exc, InvalidParams) else None
        return render(request, "costs.html", status=400 if field else 503, report=None, error=exc.message,
                      field=field, values=params, groups=GROUPS, charts=[], models=[], keys=[], csv_query="")
    values = {"start": report["start"], "end": report["end"], "group_by": report["group_by"]}
    return render(request, "costs.html", report=report, error=None, field=None, values=values, groups=GROUPS,
                  charts=report_charts(report), models=fold(by_model["rows"], "model"), keys=fold(by_key["rows"], "key_id"),
                  csv_query=urlencode({"start": report["start"], "end": report["end"],
                                       "group": report["group_by"]}))


def report_charts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A report's charts (the Costs page's, an organisation's): cost per period in each currency, then
    requests per period."""
    charts = []
    for currency in sorted(report["totals"]["cost"]):
        points = series(report, currency)
        peak = max(points, key=lambda p: p["value"])["label"].split(": ", 1)[1]
        charts.append({"title": f"Cost per {report['group_by']} ({currency})",
                       "chart": bar_chart(points, "value"), "peak": peak})
    charts.append({"title": f"Requests per {report['group_by']}", "chart": bar_chart(series(report, None), "value"),
                   "peak": None})
    return charts


@routes.get("/costs.csv")
@login_required
async def costs_csv(request: web.Request) -> web.Response:
    by = request.query.get("by") or None
    report = await request.app[UPSTREAM].auth.report(token=request[TOKEN], **report_query(request), by=by)
    return csv_response(report)
