"""API keys (create, shown once; list; revoke with confirmation; rotate, choosing the
overlap), the account page (password change, log out everywhere) and the admin page.

A new key is rendered straight into the response to the creating POST, never
redirected to a URL, so it is in no history, log or cache (`no-store`); the
page says it will not be shown again. Revoking asks first: `app.js` shows a
confirmation dialog, and without script the server asks on a page of its own
(the form's `confirm` field is only `yes` once the person has agreed). Rotating
always asks on a page of its own, script or not, since it asks how long the old
key should keep working; the new key is then shown once, like a created one.
Editing (name, allowed models, expiry, limits) is a form POST too: the first POST shows
the edit page, the second (`save=yes`) sends only the fields that changed. A key's
five limits and the account's budget are optional fields (limit_forms.py).
"""

from __future__ import annotations

import asyncio
import time
from datetime import date, datetime, timezone
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from shared.errors import MeshError
from services.auth.client import ApiKey, NewApiKey
from services.web.errors import error_headers, status_of
from services.web.forms import read_form, require, text
from services.web.limit_forms import BUDGET_FIELDS, LIMIT_FIELDS, form_values, limit_params, shown_values
from services.web.security import clear_session, client_addr, set_session
from services.web.session import (ME, TOKEN, UPSTREAM, admin_only, field_errors, form_errors, login_required,
                                  refused_form)
from services.web.views import moment, redirect, render

__all__ = ["routes", "TIERS", "OVERLAP_CHOICES"]

routes = web.RouteTableDef()

TIERS = ("free", "pro", "enterprise", "unlimited")
_EXPIRY_CHOICES = ("", "7", "30", "90", "365")
_LIMIT_NAMES = tuple(name for name, _, _ in LIMIT_FIELDS)
_BUDGET_NAMES = tuple(name for name, _, _ in BUDGET_FIELDS)
#: How long a rotated key keeps working (seconds, label); the default is 24 hours.
OVERLAP_CHOICES = (("0", "stop now"), ("3600", "1 hour"), ("86400", "24 hours"), ("604800", "7 days"),
                   ("2592000", "30 days"))
_DEFAULT_OVERLAP = "86400"


async def _keys_page(request: web.Request, *, status: int = 200, values: dict[str, str] | None = None,
                     errors: dict[str, str] | None = None, created: NewApiKey | None = None,
                     notice: str | None = None) -> web.Response:
    auth, token = request.app[UPSTREAM].auth, request[TOKEN]
    keys, orgs = await asyncio.gather(auth.list_keys(token=token), auth.orgs(token=token))
    # The rotation chain: what each key replaced, and the key replacing it (auth refuses to
    # rotate a key twice unless its successor was revoked: no Rotate button then).
    prefixes = {k["id"]: k["prefix"] for k in keys}
    successors = {k["rotated_from"]: k for k in keys if k.get("rotated_from") and k["status"] != "revoked"}
    return render(request, "keys.html", status=status, keys=list(reversed(keys)), created=created,
                  values=values or {"expires_in_days": ""}, errors=errors or {}, notice=notice,
                  expiry_choices=_EXPIRY_CHOICES, prefixes=prefixes, successors=successors, limit_fields=LIMIT_FIELDS,
                  orgs=orgs, org_names={o["id"]: o["name"] for o in orgs})


@routes.get("/keys")
@login_required
async def keys_page(request: web.Request) -> web.Response:
    notice = "Key revoked: it stops working within a second." if request.query.get("revoked") else None
    return await _keys_page(request, notice=notice)


@routes.post("/keys")
@login_required
async def create_key(request: web.Request) -> web.Response:
    form = await read_form(request)
    values = {"name": text(form, "name"), "expires_in_days": text(form, "expires_in_days"),
              "models": text(form, "models"), "org": text(form, "org"), **form_values(form)}
    errors = require(values, {"name": "a name for the key"})
    if values["expires_in_days"] not in _EXPIRY_CHOICES:
        errors["expires_in_days"] = "Choose one of the listed expiries"
    if values["org"] and not (values["org"].isdigit() and len(values["org"]) <= 18):
        errors["org"] = "Choose one of your organisations, or none"
    limits, limit_errors = limit_params(values)
    errors.update(limit_errors)
    if errors:
        return await _keys_page(request, status=400, values=values, errors=errors)
    expires = int(values["expires_in_days"]) if values["expires_in_days"] else None
    try:
        key = await request.app[UPSTREAM].auth.create_key(token=request[TOKEN], name=values["name"],
                                                          expires_in_days=expires,
                                                          allowed_models=_model_names(values["models"]),
                                                          limits={k: v for k, v in limits.items() if v is not None},
                                                          org=int(values["org"]) if values["org"] else None)
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED":
            raise
        response = await _keys_page(request, status=status_of(exc), values=values,
                                    errors=field_errors(exc, ("name", "expires_in_days", "models", "org", *_LIMIT_NAMES),
                                                        {"allowed_models": "models"}))
        response.headers.update(error_headers(exc))
        return response
    return await _keys_page(request, status=201, created=key)


@routes.post("/keys/{key_id:[0-9]{1,18}}/revoke")
@login_required
async def revoke_key(request: web.Request) -> web.Response:
    form = await read_form(request)
    key_id = int(request.match_info["key_id"])
    if text(form, "confirm") != "yes":
        return render(request, "revoke_confirm.html", key=await _own_key(request, key_id))
    await request.app[UPSTREAM].auth.revoke_key(token=request[TOKEN], key_id=key_id)
    return redirect("/keys?revoked=1")


async def _own_key(request: web.Request, key_id: int) -> ApiKey:
    """The caller's key `key_id`, as listed; 404 when the caller has no such key."""
    keys = await request.app[UPSTREAM].auth.list_keys(token=request[TOKEN])
    key = next((k for k in keys if k["id"] == key_id), None)
    if key is None:
        raise web.HTTPNotFound(text="no such key")
    return key


@routes.post("/keys/{key_id:[0-9]{1,18}}/rotate")
@login_required
async def rotate_key(request: web.Request) -> web.Response:
    form = await read_form(request)
    key_id = int(request.match_info["key_id"])
    key = await _own_key(request, key_id)
    overlap = text(form, "overlap_seconds") or _DEFAULT_OVERLAP
    if text(form, "confirm") != "yes":
        return _rotate_page(request, key, overlap)
    if overlap not in dict(OVERLAP_CHOICES):
        return _rotate_page(request, key, _DEFAULT_OVERLAP, status=400,
                            errors={"overlap_seconds": "Choose one of the listed times"})
    try:
        new = await request.app[UPSTREAM].auth.rotate_key(token=request[TOKEN], key_id=key_id,
                                                          overlap_seconds=int(overlap))
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED":
            raise
        return refused_form(request, "rotate_confirm.html", exc, field_errors(exc, ("overlap_seconds",)),
                            key=key, overlap=overlap, choices=OVERLAP_CHOICES)
    old = new["old_key"]
    if overlap == "0":
        notice = f"“{old['name']}” rotated: the old key {old['prefix']}… has stopped working."
    else:
        notice = (f"“{old['name']}” rotated: the old key {old['prefix']}… keeps working until "
                  f"{moment(old['expires_at'])} UTC, then stops.")
    return await _keys_page(request, status=201, created=new, notice=notice)


def _model_names(text: str) -> list[str] | None:
    """The models field: names separated by commas (or spaces); empty means every model."""
    names = [name for name in text.replace(",", " ").split() if name]
    return names or None


def _edit_values(key: ApiKey) -> dict[str, str]:
    """The edit form as the key is now (the expiry as a date, UTC; its limits, '' for none)."""
    expires = key.get("expires_at")
    return {"name": key["name"], "models": ", ".join(key.get("allowed_models") or []),
            "expires": datetime.fromisoformat(expires).astimezone(timezone.utc).date().isoformat() if expires else "",
            **shown_values(key.get("limits"))}


def _expiry_of(value: str) -> str | None:
    """A date from the form as the moment the key stops (the start of that day, UTC); '' is never."""
    if not value:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise ValueError("Enter a date as YYYY-MM-DD, or leave it empty for never") from None
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).isoformat()


@routes.post("/keys/{key_id:[0-9]{1,18}}/edit")
@login_required
async def edit_key(request: web.Request) -> web.Response:
    form = await read_form(request)
    key_id = int(request.match_info["key_id"])
    key = await _own_key(request, key_id)
    before = _edit_values(key)
    if text(form, "save") != "yes":
        return render(request, "key_edit.html", key=key, values=before, errors={}, limit_fields=LIMIT_FIELDS)
    values = {"name": text(form, "name"), "models": text(form, "models"), "expires": text(form, "expires"),
              **form_values(form)}
    errors = require(values, {"name": "a name for the key"})
    limits, limit_errors = limit_params(values, before)
    errors.update(limit_errors)
    changes: dict[str, Any] = {"limits": limits} if limits else {}
    try:
        if values["expires"] != before["expires"]:
            changes["expires_at"] = _expiry_of(values["expires"])
    except ValueError as exc:
        errors["expires"] = str(exc)
    if errors:
        return render(request, "key_edit.html", status=400, key=key, values=values, errors=errors,
                      limit_fields=LIMIT_FIELDS)
    if values["name"] != before["name"]:
        changes["name"] = values["name"]
    if _model_names(values["models"]) != _model_names(before["models"]):
        changes["allowed_models"] = _model_names(values["models"])
    if not changes:
        return await _keys_page(request, notice=f"“{key['name']}”: nothing changed.")
    try:
        updated = await request.app[UPSTREAM].auth.update_key(token=request[TOKEN], key_id=key_id, **changes)
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED":
            raise
        return refused_form(request, "key_edit.html", exc,
                            field_errors(exc, ("name", "models", "expires", *_LIMIT_NAMES),
                                         {"allowed_models": "models", "expires_at": "expires"}),
                            key=key, values=values, limit_fields=LIMIT_FIELDS)
    return await _keys_page(request, notice=f"“{updated['name']}” saved: gateways use the change within a second.")


def _rotate_page(request: web.Request, key: ApiKey, overlap: str, *, status: int = 200,
                 errors: dict[str, str] | None = None) -> web.Response:
    return render(request, "rotate_confirm.html", status=status, key=key, overlap=overlap,
                  choices=OVERLAP_CHOICES, errors=errors or {})


# -- account: budget, password, log out everywhere -------------------------------------------

_PASSWORD_FIELDS = ("old_password", "new_password", "new_password2")


_NOTICES = {"changed": "Password changed: every other session has ended.",
            "budget": "Budget saved: gateways use it within a second."}


def _account(request: web.Request, *, status: int = 200, errors: dict[str, str] | None = None,
             notice: str | None = None, budget: dict[str, str] | None = None,
             refused: MeshError | None = None) -> web.Response:
    """The account page; the budget form as typed (`budget`), else as the account's budget is now;
    after a `refused` form, with that error's status and headers (e.g. `Retry-After`)."""
    values = budget if budget is not None else shown_values(request[ME].get("budget"), _BUDGET_NAMES)
    response = render(request, "account.html", status=status_of(refused) if refused else status,
                      errors=errors or {}, notice=notice, budget_fields=BUDGET_FIELDS, budget_values=values)
    response.headers.update(error_headers(refused) if refused else {})
    return response


@routes.get("/account")
@login_required
async def account_page(request: web.Request) -> web.Response:
    notice = next((text for name, text in _NOTICES.items() if request.query.get(name)), None)
    return _account(request, notice=notice)


@routes.post("/account/budget")
@login_required
async def set_budget(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    values = form_values(form, _BUDGET_NAMES)
    changes, _ = limit_params(values, shown_values(request[ME].get("budget"), _BUDGET_NAMES), _BUDGET_NAMES)
    if not changes:
        return _account(request, notice="Budget: nothing changed.")
    try:
        await request.app[UPSTREAM].auth.set_budget(token=request[TOKEN], **changes)
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED":
            raise
        return _account(request, errors=field_errors(exc, _BUDGET_NAMES), budget=values, refused=exc)
    return redirect("/account?budget=1")


@routes.post("/account/password")
@login_required
async def change_password(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    values = {name: text(form, name, strip=False) for name in _PASSWORD_FIELDS}
    errors = require(values, {"old_password": "your current password", "new_password": "a new password",
                              "new_password2": "the new password again"})
    if not errors and values["new_password"] != values["new_password2"]:
        errors["new_password2"] = "The two passwords differ"
    if errors:
        return _account(request, status=400, errors=errors)
    try:
        answer = await request.app[UPSTREAM].auth.change_password(
            token=request[TOKEN], old_password=values["old_password"],
            new_password=values["new_password"], client_addr=client_addr(request))
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED" and exc.data.get("param") != "old_password":
            raise  # the session itself ended: back to the login page
        return _account(request, errors=form_errors(exc, _PASSWORD_FIELDS), refused=exc)
    response = redirect("/account?changed=1")
    set_session(response, request, answer["token"], answer["expires_at"], time.time())
    return response


@routes.post("/account/logout-all")
@login_required
async def logout_all(request: web.Request) -> web.StreamResponse:
    await read_form(request)
    await request.app[UPSTREAM].auth.logout_all(token=request[TOKEN])
    response = redirect("/")
    clear_session(response, request)
    return response


# -- admin -------------------------------------------------------------------------------------


async def _admin_page(request: web.Request, *, status: int = 200, values: dict[str, str] | None = None,
                      errors: dict[str, str] | None = None, notice: str | None = None) -> web.Response:
    auth, token = request.app[UPSTREAM].auth, request[TOKEN]
    (users, users_error), (top, top_error) = await asyncio.gather(
        _settle(auth.list_users(token=token)), _settle(auth.top_spenders(token=token, limit=20)))
    return render(request, "admin.html", status=status, users=users or [], users_error=users_error,
                  spenders=(top or {}).get("spenders", []), top=top, top_error=top_error,
                  tiers=TIERS, values=values or {}, errors=errors or {}, notice=notice)


async def _settle(call: Awaitable[Any]) -> tuple[Any, str | None]:
    """A panel's data, or why it cannot be shown; a refused session or admin goes up."""
    try:
        return await call, None
    except MeshError as exc:
        if exc.code in ("UNAUTHENTICATED", "FORBIDDEN"):
            raise
        return None, f"{exc.message} ({exc.code})"


@routes.get("/admin")
@login_required
async def admin_page(request: web.Request) -> web.Response:
    admin_only(request)
    return await _admin_page(request)


@routes.post("/admin/users")
@login_required
async def admin_update(request: web.Request) -> web.Response:
    admin_only(request)
    form = await read_form(request)
    values = {"user": text(form, "user"), "tier": text(form, "tier"), "active": text(form, "active")}
    errors = require(values, {"user": "a username, email or id"})
    if values["tier"] not in ("", *TIERS):
        errors["tier"] = "Choose a tier"
    if values["active"] not in ("", "yes", "no"):
        errors["active"] = "Choose enabled or disabled"
    if not errors and not values["tier"] and not values["active"]:
        errors["_form"] = "Choose a tier or an account state to change"
    if errors:
        return await _admin_page(request, status=400, values=values, errors=errors)
    user: int | str = int(values["user"]) if values["user"].isdigit() else values["user"]
    upstream, token = request.app[UPSTREAM], request[TOKEN]
    try:
        if values["tier"]:
            updated = await upstream.auth.set_tier(token=token, user=user, tier=values["tier"])
        if values["active"]:
            updated = await upstream.auth.set_active(token=token, user=user, active=values["active"] == "yes")
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED":
            raise
        errors = {"user": exc.message} if exc.code == "NOT_FOUND" else field_errors(exc, ("user", "tier", "active"))
        return await _admin_page(request, status=status_of(exc), values=values, errors=errors)
    state = "enabled" if updated["is_active"] else "disabled"
    return await _admin_page(request, notice=f"{updated['username']}: {updated['tier']} tier, {state}")
