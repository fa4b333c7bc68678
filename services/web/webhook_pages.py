"""The Webhook page (`/account/webhook`): where spending alerts are sent, its secret, its delivery log.

Saving creates the webhook (auth answers with its signing secret, shown on
the page that answers the form and never again: it is not put in a cookie or
a redirect) or changes its URL and thresholds (the secret is kept). "New
secret" rotates it, shown the same way once; "Remove" deletes the webhook.
Thresholds are typed as `50, 80, 100`; auth checks them and the URL (a public
address), and a refusal is shown next to the field it names.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shared.errors import MeshError
from services.web.errors import status_of
from services.web.forms import read_form, text
from services.web.session import TOKEN, UPSTREAM, field_errors, login_required
from services.web.views import redirect, render

__all__ = ["routes"]

routes = web.RouteTableDef()

_FIELDS = ("url", "thresholds")
_DEFAULT_THRESHOLDS = "50, 80, 100"


@routes.get("/account/webhook")
@login_required
async def webhook_page(request: web.Request) -> web.Response:
    notice = "Webhook removed." if request.query.get("removed") else None
    return await _page(request, notice=notice)


@routes.post("/account/webhook")
@login_required
async def save_webhook(request: web.Request) -> web.Response:
    form = await read_form(request)
    values = {name: text(form, name) for name in _FIELDS}
    thresholds = _thresholds(values["thresholds"])
    if thresholds is None:
        return await _page(request, status=400, values=values,
                           errors={"thresholds": "Enter percentages from 1 to 100, e.g. 50, 80, 100"})
    try:
        hook = await request.app[UPSTREAM].auth.set_webhook(token=request[TOKEN], url=values["url"],
                                                           thresholds=thresholds)
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED":
            raise
        return await _page(request, status=status_of(exc), values=values,
                           errors=field_errors(exc, _FIELDS))
    return await _page(request, secret=hook["secret"], notice="Webhook saved.")


@routes.post("/account/webhook/rotate")
@login_required
async def rotate_secret(request: web.Request) -> web.Response:
    await read_form(request)
    hook = await request.app[UPSTREAM].auth.rotate_webhook_secret(token=request[TOKEN])
    return await _page(request, secret=hook["secret"], notice="New signing secret: the old one no longer signs.")


@routes.post("/account/webhook/remove")
@login_required
async def remove_webhook(request: web.Request) -> web.StreamResponse:
    await read_form(request)
    await request.app[UPSTREAM].auth.remove_webhook(token=request[TOKEN])
    return redirect("/account/webhook?removed=1")


def _thresholds(typed: str) -> list[int] | None:
    """`50, 80, 100` as numbers (auth checks their range); None when it is not a list of numbers."""
    parts = [p.strip() for p in (typed or _DEFAULT_THRESHOLDS).replace("%", "").split(",") if p.strip()]
    if not parts or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        return None
    return [int(p) for p in parts]


async def _page(request: web.Request, *, status: int = 200, values: dict[str, str] | None = None,
                errors: dict[str, str] | None = None, secret: str | None = None,
                notice: str | None = None) -> web.Response:
    """The page: the form (as typed, else as the webhook is), the secret when just made, the log."""
    auth, token = request.app[UPSTREAM].auth, request[TOKEN]
    hook: dict[str, Any] | None
    try:
        hook = dict(await auth.webhook(token=token))
    except MeshError as exc:
        if exc.code != "NOT_FOUND":
            raise
        hook = None
    log = (await auth.webhook_deliveries(token=token, limit=50))["deliveries"] if hook else []
    shown = values or {"url": hook["url"] if hook else "",
                       "thresholds": ", ".join(map(str, hook["thresholds"])) if hook else _DEFAULT_THRESHOLDS}
    return render(request, "webhook.html", status=status, hook=hook, values=shown, errors=errors or {},
                  secret=secret, notice=notice, deliveries=log)
