"""Rendering pages: the jinja2 environment, the page context, and chart geometry.

Templates autoescape everything. Charts are inline SVG computed here (bars as
`<rect>` with presentation attributes): no script and no inline style, so the
CSP needs neither `unsafe-inline` nor a CDN, and pages work offline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from services.web.security import CSRF_FIELD, Csrf

__all__ = ["TEMPLATES", "CSRF", "TOKEN", "ME", "make_environment", "render", "redirect", "moment", "daily_series", "bar_chart", "quota_bars",
           "humanize_duration"]

TEMPLATE_DIR = Path(__file__).with_name("templates")
TEMPLATES = web.AppKey("templates", jinja2.Environment)
CSRF = web.AppKey("csrf", Csrf)
#: On requests of logged-in browsers: the session token and auth's view of the account.
TOKEN = web.RequestKey("token", str)
ME = web.RequestKey("me", dict)


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["day"] = lambda text: (text or "-")[:10]
    env.filters["moment"] = moment
    env.filters["thousands"] = lambda n: f"{n:,}" if isinstance(n, (int, float)) else n
    return env


def moment(value: Any) -> str:
    """An ISO timestamp or epoch seconds as `YYYY-MM-DD HH:MM` (UTC)."""
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, timezone.utc).isoformat()
    return str(value or "-")[:16].replace("T", " ")


def render(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    """The page `template` with the common context: user, CSRF token, current path."""
    csrf = request.app[CSRF]
    page = request.app[TEMPLATES].get_template(template).render(
        user=request.get(ME), csrf_field=CSRF_FIELD, csrf_token=csrf.token(request),
        path=request.path, **context)
    response = web.Response(text=page, status=status, content_type="text/html")
    csrf.set_cookie(request, response)
    return response


def redirect(location: str) -> web.Response:
    """303 See Other: after a form, the browser GETs `location` (cookies may be added)."""
    return web.Response(status=303, headers={"Location": location})


def daily_series(days: Iterable[Mapping[str, Any]], end: date | None = None, length: int = 30) -> list[dict[str, Any]]:
    """Requests and tokens per UTC day (summed over keys), `length` days ending `end`, zeros included."""
    last = end or datetime.now(timezone.utc).date()
    series = {(last - timedelta(days=i)).isoformat(): {"requests": 0, "tokens": 0, "errors": 0}
              for i in range(length - 1, -1, -1)}
    for row in days:
        slot = series.get(str(row.get("day")))
        if slot is not None:
            for name in ("requests", "tokens", "errors"):
                slot[name] += int(row.get(name) or 0)
    return [{"day": day, **values} for day, values in series.items()]


def bar_chart(series: list[dict[str, Any]], field: str, *, width: int = 600, height: int = 140) -> dict[str, Any]:
    """Geometry of one SVG bar chart: bars, the maximum, and axis labels (a row's own `label`, if it
    has one, is its bar's tooltip)."""
    peak = max((row[field] for row in series), default=0)
    slot = width / max(len(series), 1)
    bars = []
    for index, row in enumerate(series):
        value = row[field]
        bar_height = 0.0 if peak == 0 else max(1.0, (height - 16) * value / peak) if value else 0.0
        bars.append({"x": round(index * slot + 1, 2), "y": round(height - bar_height, 2),
                     "width": round(max(slot - 2, 1), 2), "height": round(bar_height, 2),
                     "label": row.get("label") or f"{row['day']}: {value:,} {field}"})
    return {"bars": bars, "peak": peak, "width": width, "height": height, "field": field,
            "first": series[0]["day"] if series else "", "last": series[-1]["day"] if series else ""}


_COUNTER_LABELS = {
    "requests_per_hour": "Requests in the last hour",
    "requests_per_month": "Requests this month",
    "tokens_per_month": "Tokens this month",
    "spend_per_day": "Spend today",
    "spend_per_month": "Spend this month",
}


def quota_bars(limits: Mapping[str, Mapping[str, Any]], now: float) -> list[dict[str, Any]]:
    """One bar per counter: used of limit, and when it resets."""
    bars = []
    for counter, label in _COUNTER_LABELS.items():
        facts = limits.get(counter)
        if not isinstance(facts, Mapping):
            continue
        limit, remaining = facts.get("limit"), facts.get("remaining")
        reset = facts.get("reset")
        resets_in = humanize_duration(reset - now) if isinstance(reset, (int, float)) else "-"
        if isinstance(limit, str) and isinstance(remaining, str):  # money: exact decimal strings
            used = max(Decimal(limit) - Decimal(remaining), Decimal(0))
            bars.append({"counter": counter, "label": label, "money": True, "limit": limit, "remaining": remaining,
                         "used": str(used), "high": str(Decimal(limit) * Decimal("0.8")), "unlimited": False,
                         "resets_in": resets_in, "scope": facts.get("scope")})
            continue
        if not isinstance(limit, (int, float)) or not isinstance(remaining, (int, float)):
            bars.append({"counter": counter, "label": label, "unlimited": True, "money": False, "resets_in": resets_in})
            continue
        bars.append({
            "counter": counter, "label": label, "limit": int(limit), "remaining": int(remaining),
            "used": max(int(limit) - int(remaining), 0), "unlimited": False, "money": False, "resets_in": resets_in,
        })
    return bars


def humanize_duration(seconds: float) -> str:
    """`2d 3h`, `59m`, `12s`."""
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"
