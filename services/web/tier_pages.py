"""The Tiers page (`GET /admin/tiers`), for administrators: every tier's limits, and a form per tier.

Each form shows the tier's values as they are; saving sends them all to
`auth.set_tier_limits` (a value equal to the current one changes nothing, and
only what changed is audited). An empty field is "no limit". Counts are
whole numbers, checked here so the field can say so; budgets are sent as
typed, for auth to check (exact decimals). A refusal is shown next to the
field it names, in that tier's form. Every gateway applies a change within a
second (services/auth/README.md, "Tiers").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from shared.errors import MeshError
from shared.tiers import LIMIT_NAMES, MONEY_LIMITS
from services.web.errors import status_of
from services.web.forms import read_form, text
from services.web.session import TOKEN, UPSTREAM, admin_only, field_errors, login_required
from services.web.views import render

__all__ = ["routes", "LABELS", "form_limits"]

routes = web.RouteTableDef()

#: Each limit as the page names it (the table's columns and the forms' fields).
LABELS = {"requests_per_hour": "Requests/hour", "requests_per_month": "Requests/month",
          "tokens_per_month": "Tokens/month", "spend_per_day": "Budget/day", "spend_per_month": "Budget/month"}
_PRIORITIES = range(10)


@routes.get("/admin/tiers")
@login_required
async def tiers_page(request: web.Request) -> web.Response:
    admin_only(request)
    return await _page(request)


@routes.post("/admin/tiers/{name}")
@login_required
async def tier_update(request: web.Request) -> web.Response:
    admin_only(request)
    name = request.match_info["name"]
    form = await read_form(request)
    values = {field: text(form, field) for field in (*LIMIT_NAMES, "priority")}
    limits, errors = form_limits(values)
    if not values["priority"].isdigit():
        errors["priority"] = "Choose a priority"
    if errors:
        return await _page(request, status=400, editing=name, values=values, errors=errors)
    try:
        tier = await request.app[UPSTREAM].auth.set_tier_limits(
            token=request[TOKEN], name=name, limits=limits, priority=int(values["priority"]))
    except MeshError as exc:
        if exc.code in ("UNAUTHENTICATED", "FORBIDDEN"):
            raise
        return await _page(request, status=status_of(exc), editing=name, values=values,
                           errors=field_errors(exc, (*LIMIT_NAMES, "priority")))
    return await _page(request, notice=f"{tier['name']}: saved; every gateway applies it within a second")


def form_limits(values: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The limits as auth takes them (empty: no limit), and the fields that are not numbers."""
    limits: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for field in LIMIT_NAMES:
        typed = values[field].replace(",", "").replace("_", "")
        if not typed:
            limits[field] = None
        elif field in MONEY_LIMITS:
            limits[field] = typed
        elif typed.isascii() and typed.isdigit():
            limits[field] = int(typed)
        else:
            errors[field] = "Enter a whole number, or leave it empty for no limit"
    return limits, errors


async def _page(request: web.Request, *, status: int = 200, editing: str | None = None,
                values: Mapping[str, str] | None = None, errors: Mapping[str, str] | None = None,
                notice: str | None = None) -> web.Response:
    """The page; the tier being edited shows what was typed and its errors, the others their values."""
    tiers = await request.app[UPSTREAM].auth.tiers(token=request[TOKEN])
    forms = {t["name"]: dict(values) if t["name"] == editing and values is not None else _form_values(t)
             for t in tiers}
    return render(request, "tiers.html", status=status, tiers=tiers, forms=forms, editing=editing,
                  errors=errors or {}, notice=notice, labels=LABELS, priorities=_PRIORITIES)


def _form_values(tier: Mapping[str, Any]) -> dict[str, str]:
    values = {field: "" if value is None else str(value) for field, value in tier["limits"].items()}
    return {**values, "priority": str(tier["priority"])}
