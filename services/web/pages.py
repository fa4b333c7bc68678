"""The dashboard's pages: landing, register, login, logout, dashboard, models, status.

Every form is CSRF-checked (`forms.read_form`) and re-rendered with its errors
next to the fields; statuses come from the error table. API keys and the admin
page are in `account_pages.py`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from shared.errors import MeshError
from shared.logging import get_logger
from services.web.forms import read_form, require, text
from services.web.ratelimits import facts_of
from services.web.security import SESSION_COOKIE, clear_session, client_addr, set_session
from services.web.upstream import model_rows
from services.web.session import (TOKEN, UPSTREAM, admin_only, form_errors, load_session, login_required,
                                  refused_form, safe_next)
from services.web.views import bar_chart, daily_series, quota_bars, redirect, render

log = get_logger(__name__)

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/")
async def landing(request: web.Request) -> web.Response:
    await load_session(request)
    return render(request, "landing.html")


# -- register ---------------------------------------------------------------------------

_REGISTER_FIELDS = ("username", "email", "password", "password2")


@routes.get("/register")
async def register_form(request: web.Request) -> web.Response:
    return render(request, "register.html", values={}, errors={})


@routes.post("/register")
async def register_submit(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    values = {"username": text(form, "username"), "email": text(form, "email"),
              "password": text(form, "password", strip=False), "password2": text(form, "password2", strip=False)}
    errors = require(values, {"username": "a username", "email": "your email", "password": "a password",
                              "password2": "the password again"})
    if not errors and values["password"] != values["password2"]:
        errors["password2"] = "The two passwords differ"
    kept = {"username": values["username"], "email": values["email"]}  # never echo a password
    if errors:
        return render(request, "register.html", status=400, values=kept, errors=errors)
    try:
        await request.app[UPSTREAM].auth.register(username=values["username"], email=values["email"],
                                                  password=values["password"], client_addr=client_addr(request))
    except MeshError as exc:
        if exc.code == "CONFLICT":  # only a taken username: a taken email is not told (auth)
            errors = {"username": "That username is taken"}
        else:
            errors = form_errors(exc, _REGISTER_FIELDS)
        return refused_form(request, "register.html", exc, errors, values=kept)
    return redirect("/login?registered=1")


# -- login / logout ---------------------------------------------------------------------------


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html", values={"next": safe_next(request.query.get("next"))}, errors={},
                  registered=request.query.get("registered") == "1")


@routes.post("/login")
async def login_submit(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    values = {"username_or_email": text(form, "username_or_email"), "password": text(form, "password", strip=False),
              "next": safe_next(text(form, "next"))}
    kept = {"username_or_email": values["username_or_email"], "next": values["next"]}
    errors = require(values, {"username_or_email": "your username or email", "password": "your password"})
    if errors:
        return render(request, "login.html", status=400, values=kept, errors=errors, registered=False)
    try:
        answer = await request.app[UPSTREAM].auth.login(
            username_or_email=values["username_or_email"], password=values["password"],
            client_addr=client_addr(request))
    except MeshError as exc:
        errors = form_errors(exc, ("username_or_email", "password"))
        return refused_form(request, "login.html", exc, errors, values=kept, registered=False)
    response = redirect(values["next"])
    set_session(response, request, answer["token"], answer["expires_at"], time.time())
    return response


@routes.post("/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    await read_form(request)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        try:  # ends the session everywhere, not only in this browser
            await request.app[UPSTREAM].auth.logout(token=token)
        except MeshError as exc:  # an expired or forged cookie, or auth away: the cookie goes anyway
            log.info("logout not recorded by auth", code=exc.code)
    response = redirect("/")
    clear_session(response, request)
    return response


# -- dashboard -------------------------------------------------------------------------------


async def _settle(call: Any) -> tuple[Any, str | None]:
    """A panel's data, or the reason it cannot be shown (the page still renders)."""
    try:
        return await call, None
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED":
            raise
        return None, f"{exc.message} ({exc.code})"


@routes.get("/dashboard")
@login_required
async def dashboard(request: web.Request) -> web.Response:
    upstream, token = request.app[UPSTREAM], request[TOKEN]
    (usage, usage_error), (quota, quota_error), (recent, recent_error), (alerts, alerts_error) = await asyncio.gather(
        _settle(upstream.auth.usage(token=token)),
        _settle(upstream.gateway.quota(token=token)),
        _settle(upstream.auth.recent_usage(token=token, limit=20)),
        _settle(upstream.auth.alerts(token=token, limit=10)),
    )
    series = daily_series(usage["days"] if usage else [])
    return render(
        request, "dashboard.html",
        totals=(usage or {}).get("totals", {}), usage_error=usage_error,
        requests_chart=bar_chart(series, "requests"), tokens_chart=bar_chart(series, "tokens"),
        quota=quota_bars(facts_of(quota), time.time()) if quota else [], quota_error=quota_error,
        currency=(quota or {}).get("currency"),
        recent=_rows(recent), recent_error=recent_error,
        alerts=(alerts or {}).get("alerts", []), alerts_error=alerts_error,
    )


def _rows(recent: Any) -> list[dict[str, Any]]:
    if isinstance(recent, dict):
        recent = recent.get("requests") or recent.get("items") or []
    return [row for row in recent or [] if isinstance(row, dict)]


# -- models and status ---------------------------------------------------------------------------


@routes.get("/models")
@login_required
async def models_page(request: web.Request) -> web.Response:
    """What is served (`gateway.models`), with slots and queues from the health report when it has them."""
    upstream = request.app[UPSTREAM]
    (answer, error), (report, _) = await asyncio.gather(_settle(upstream.gateway.models()),
                                                        _settle(upstream.metrics.health()))
    capacity = (report or {}).get("models") or {}
    rows = [{**row, "capacity": capacity.get(row["name"]) or {}} for row in model_rows(answer)]
    return render(request, "models.html", models=rows, error=error)


@routes.get("/status")
@login_required
async def status_page(request: web.Request) -> web.Response:
    admin_only(request)  # the report names every endpoint of the mesh
    report, error = await _settle(request.app[UPSTREAM].metrics.health())
    return render(request, "status.html", report=report or {}, error=error, now=time.time())
