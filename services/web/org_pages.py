"""The Organisations pages, for a logged-in browser.

`GET /orgs` lists the caller's organisations and the invitations to them
(accept or decline), with a form to create one. `GET /orgs/{id}` is one
organisation: its members (owners change roles; owners and admins remove,
anyone may leave -- removing asks first, like revoking a key), the invitation
form and the limits form (owners and admins; an empty limit is none), and its
usage per period (the Costs page's charts) and per member (a plain member:
their own), with a CSV download (`GET /orgs/{id}/report.csv`). Every form posts and the page is rendered again with a notice or
the refusal next to the field it names; auth decides who may do what.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from shared.errors import InvalidParams, MeshError
from shared.tiers import LIMIT_NAMES
from services.web.cost_pages import GROUPS, report_charts, report_query
from services.web.errors import status_of
from services.web.forms import read_form, require, text
from services.web.report_views import csv_response
from services.web.session import ME, TOKEN, UPSTREAM, field_errors, login_required
from services.web.tier_pages import LABELS, form_limits
from services.web.views import redirect, render

__all__ = ["routes", "ROLES"]

routes = web.RouteTableDef()

ROLES = ("member", "admin", "owner")
_ID = "{org_id:[0-9]{1,18}}"
_MEMBER = _ID + "/members/{user_id:[0-9]{1,18}}"
#: What a page says after a redirect (its query names the event).
_NOTICES = {"created": "Organisation created: you own it.", "joined": "Welcome: you are a member now.",
            "left": "You have left the organisation.", "declined": "Invitation declined."}


async def _orgs_page(request: web.Request, *, status: int = 200, values: dict[str, str] | None = None,
                     errors: dict[str, str] | None = None, notice: str | None = None) -> web.Response:
    auth, token = request.app[UPSTREAM].auth, request[TOKEN]
    orgs, invites = await asyncio.gather(auth.orgs(token=token), auth.invitations(token=token))
    return render(request, "orgs.html", status=status, orgs=orgs, invites=invites, values=values or {},
                  errors=errors or {}, notice=notice)


@routes.get("/orgs")
@login_required
async def orgs_page(request: web.Request) -> web.Response:
    notice = next((n for q, n in _NOTICES.items() if request.query.get(q)), None)
    return await _orgs_page(request, notice=notice)


@routes.post("/orgs")
@login_required
async def create_org(request: web.Request) -> web.Response:
    form = await read_form(request)
    values = {"name": text(form, "name")}
    errors = require(values, {"name": "a name for the organisation"})
    if errors:
        return await _orgs_page(request, status=400, values=values, errors=errors)
    try:
        org = await request.app[UPSTREAM].auth.create_org(token=request[TOKEN], name=values["name"])
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED":
            raise
        return await _orgs_page(request, status=status_of(exc), values=values, errors=field_errors(exc, ("name",)))
    return redirect(f"/orgs/{org['id']}?created=1")


@routes.post("/invites/{invite_id:[0-9]{1,18}}")
@login_required
async def answer_invite(request: web.Request) -> web.Response:
    form = await read_form(request)
    accept = text(form, "answer") == "accept"
    answer = await request.app[UPSTREAM].auth.answer_invite(
        token=request[TOKEN], invite_id=int(request.match_info["invite_id"]), accept=accept)
    return redirect(f"/orgs/{answer['org']['id']}?joined=1" if answer["org"] else "/orgs?declined=1")


@routes.get("/orgs/" + _ID)
@login_required
async def org_page(request: web.Request) -> web.Response:
    notice = next((n for q, n in _NOTICES.items() if request.query.get(q)), None)
    return await _org_page(request, notice=notice)


@routes.get("/orgs/" + _ID + "/report.csv")
@login_required
async def report_csv(request: web.Request) -> web.Response:
    report = await request.app[UPSTREAM].auth.org_report(
        token=request[TOKEN], org=int(request.match_info["org_id"]), **report_query(request),
        by=request.query.get("by") or None)
    return csv_response(report)


async def _org_page(request: web.Request, *, status: int = 200, form: str | None = None,
                    values: dict[str, str] | None = None, errors: dict[str, str] | None = None,
                    notice: str | None = None) -> web.Response:
    """The page; `form` names the form whose `values` and `errors` are shown (invite, limits)."""
    auth, token, org_id = request.app[UPSTREAM].auth, request[TOKEN], int(request.match_info["org_id"])
    org = await auth.org(token=token, org=org_id)
    params = report_query(request)
    try:
        report, by_member = await asyncio.gather(
            auth.org_report(token=token, org=org_id, **params),
            auth.org_report(token=token, org=org_id, **params, by="member"))
        report_error, field = None, None
    except InvalidParams as exc:
        report = by_member = None
        report_error, field = exc.message, exc.data.get("param")
    limits = {f: "" if v is None else str(v) for f, v in org["limits"].items()}
    return render(request, "org.html", status=status, org=org, notice=notice, roles=ROLES, labels=LABELS,
                  form=form, values=values or {}, errors=errors or {}, limits=limits,
                  manager=org["role"] in ("owner", "admin"), report=report, by_member=by_member,
                  charts=report_charts(report) if report else [], report_error=report_error, field=field,
                  range=params if report is None else {"start": report["start"], "end": report["end"],
                                                       "group_by": report["group_by"]}, groups=GROUPS)


async def _act(request: web.Request, form: str, fields: tuple[str, ...], values: dict[str, str],
               call: Any, notice: str, done: str | None = None) -> web.Response:
    """Run auth's `call`; the page again with `notice` (or a redirect to `done`), or with the
    refusal next to its field."""
    try:
        await call
    except MeshError as exc:
        if exc.code in ("UNAUTHENTICATED", "NOT_FOUND") and form != "invite":
            raise
        return await _org_page(request, status=status_of(exc), form=form, values=values,
                               errors=field_errors(exc, fields))
    return redirect(done) if done else await _org_page(request, notice=notice)


@routes.post("/orgs/" + _ID + "/invite")
@login_required
async def invite(request: web.Request) -> web.Response:
    form = await read_form(request)
    values = {"username": text(form, "username"), "role": text(form, "role") or "member"}
    errors = require(values, {"username": "their username"})
    if errors:
        return await _org_page(request, status=400, form="invite", values=values, errors=errors)
    call = request.app[UPSTREAM].auth.invite(token=request[TOKEN], org=int(request.match_info["org_id"]),
                                             username=values["username"], role=values["role"])
    return await _act(request, "invite", ("username", "role"), values, call,
                      f"{values['username']} is invited as {values['role']}.")


@routes.post("/orgs/" + _ID + "/limits")
@login_required
async def set_limits(request: web.Request) -> web.Response:
    form = await read_form(request)
    values = {field: text(form, field) for field in LIMIT_NAMES}
    limits, errors = form_limits(values)
    if errors:
        return await _org_page(request, status=400, form="limits", values=values, errors=errors)
    call = request.app[UPSTREAM].auth.set_org_limits(token=request[TOKEN], org=int(request.match_info["org_id"]),
                                                     limits=limits)
    return await _act(request, "limits", LIMIT_NAMES, values, call,
                      "Limits saved: every gateway applies them within a second.")


@routes.post("/orgs/" + _MEMBER + "/role")
@login_required
async def set_role(request: web.Request) -> web.Response:
    form = await read_form(request)
    user_id = int(request.match_info["user_id"])
    values = {"role": text(form, "role")}
    call = request.app[UPSTREAM].auth.set_member_role(token=request[TOKEN], org=int(request.match_info["org_id"]),
                                                      user=user_id, role=values["role"])
    return await _act(request, f"member-{user_id}", ("role",), values, call, f"Role changed to {values['role']}.")


@routes.post("/orgs/" + _MEMBER + "/remove")
@login_required
async def remove(request: web.Request) -> web.Response:
    form = await read_form(request)
    org_id, user_id = int(request.match_info["org_id"]), int(request.match_info["user_id"])
    auth, token = request.app[UPSTREAM].auth, request[TOKEN]
    if text(form, "confirm") != "yes":
        org = await auth.org(token=token, org=org_id)
        member = next((m for m in org["members"] if m["user_id"] == user_id), None)
        if member is None:
            raise web.HTTPNotFound(text="no such member")
        return render(request, "org_remove_confirm.html", org=org, member=member)
    call = auth.remove_member(token=token, org=org_id, user=user_id)
    leaving = request[ME]["id"] == user_id  # then the page is gone for them: back to the list
    return await _act(request, f"member-{user_id}", (), {}, call,
                      "Member removed: their keys of the organisation stop working within a second.",
                      done="/orgs?left=1" if leaving else None)
