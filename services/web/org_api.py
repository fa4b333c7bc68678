"""The REST API of organisations (JSON; auth's `auth.create_org` ... `auth.org_report`).

    GET    /api/orgs                          Bearer token  -> {orgs: [...]}: yours, with your role
    POST   /api/orgs                          {name}        -> 201 the organisation (you own it)
    GET    /api/orgs/{org}                    Bearer token  -> limits, members, pending invitations
    POST   /api/orgs/{org}/invites            {username, role?}  -> 201 the invitation
    GET    /api/invites                       Bearer token  -> {invites: [...]}: to you, not answered
    POST   /api/invites/{id}                  {accept: true|false}  -> {accepted, org}
    PATCH  /api/orgs/{org}/members/{user}     {role}        -> the member (owners)
    DELETE /api/orgs/{org}/members/{user}     Bearer token  -> {removed, revoked_keys}
    PUT    /api/orgs/{org}/limits             {requests_per_hour?, ..., spend_per_month? (null: none)}:
                                              those given change, the others are kept -> the organisation
    GET    /api/orgs/{org}/report?start&end&group&by      -> usage and cost (by member|model|key)
    GET    /api/orgs/{org}/report.csv?...                 -> the same rows as a CSV download

`{org}` is an organisation's id (digits) or its name (URL-encoded); `{user}`
a member's id or username. Errors as in api.py; one the caller is not a
member of is 404, like one that does not exist. Budgets are taken as written
(never through a float), as for the tiers (api.py).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shared.errors import InvalidParams
from shared.tiers import LIMIT_NAMES
from services.web.api import bearer, json_body, known_fields
from services.web.report_views import csv_response
from services.web.session import UPSTREAM

__all__ = ["routes", "ref"]

routes = web.RouteTableDef()


def ref(text: str) -> int | str:
    """An id (digits) or a name, as a path gives it."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else text


def _fields(body: dict[str, Any], allowed: set[str], required: set[str]) -> dict[str, Any]:
    """The body's fields, each a string unless said otherwise by the caller; unknown or missing refused."""
    known_fields(body, allowed)
    for name in sorted(required):
        if not isinstance(body.get(name), str) or not body[name]:
            raise InvalidParams(f"{name} must be a non-empty string", {"param": name})
    return body


@routes.get("/api/orgs")
async def orgs(request: web.Request) -> web.Response:
    return web.json_response({"orgs": await request.app[UPSTREAM].auth.orgs(token=bearer(request))})


@routes.post("/api/orgs")
async def create_org(request: web.Request) -> web.Response:
    token = bearer(request)
    body = _fields(await json_body(request), {"name"}, {"name"})
    org = await request.app[UPSTREAM].auth.create_org(token=token, name=body["name"])
    return web.json_response(org, status=201)


@routes.get("/api/orgs/{org}")
async def org(request: web.Request) -> web.Response:
    answer = await request.app[UPSTREAM].auth.org(token=bearer(request), org=ref(request.match_info["org"]))
    return web.json_response(answer)


@routes.post("/api/orgs/{org}/invites")
async def invite(request: web.Request) -> web.Response:
    token = bearer(request)
    body = _fields(await json_body(request), {"username", "role"}, {"username"})
    role = body.get("role")
    if role is not None and not isinstance(role, str):
        raise InvalidParams("role must be owner, admin or member", {"param": "role"})
    answer = await request.app[UPSTREAM].auth.invite(token=token, org=ref(request.match_info["org"]),
                                                     username=body["username"], role=role)
    return web.json_response(answer, status=201)


@routes.get("/api/invites")
async def invitations(request: web.Request) -> web.Response:
    return web.json_response({"invites": await request.app[UPSTREAM].auth.invitations(token=bearer(request))})


@routes.post("/api/invites/{invite_id}")
async def answer_invite(request: web.Request) -> web.Response:
    token = bearer(request)
    invite_id = ref(request.match_info["invite_id"])
    if not isinstance(invite_id, int):
        raise InvalidParams("the invitation id must be a positive integer", {"param": "invite_id"})
    body = _fields(await json_body(request), {"accept"}, set())
    if not isinstance(body.get("accept"), bool):
        raise InvalidParams("accept must be true or false", {"param": "accept"})
    answer = await request.app[UPSTREAM].auth.answer_invite(token=token, invite_id=invite_id, accept=body["accept"])
    return web.json_response(answer)


@routes.patch("/api/orgs/{org}/members/{user}")
async def set_member_role(request: web.Request) -> web.Response:
    token = bearer(request)
    body = _fields(await json_body(request), {"role"}, {"role"})
    member = await request.app[UPSTREAM].auth.set_member_role(
        token=token, org=ref(request.match_info["org"]), user=ref(request.match_info["user"]), role=body["role"])
    return web.json_response(member)


@routes.delete("/api/orgs/{org}/members/{user}")
async def remove_member(request: web.Request) -> web.Response:
    answer = await request.app[UPSTREAM].auth.remove_member(
        token=bearer(request), org=ref(request.match_info["org"]), user=ref(request.match_info["user"]))
    return web.json_response(answer)


@routes.put("/api/orgs/{org}/limits")
async def set_org_limits(request: web.Request) -> web.Response:
    """The limits given change (money as written, never through a float), the others are kept."""
    token = bearer(request)
    body = _fields(await json_body(request, exact=True), set(LIMIT_NAMES), set())
    answer = await request.app[UPSTREAM].auth.set_org_limits(token=token, org=ref(request.match_info["org"]),
                                                             limits=body)
    return web.json_response(answer)


async def _report(request: web.Request) -> Any:
    query = request.query
    return await request.app[UPSTREAM].auth.org_report(
        token=bearer(request), org=ref(request.match_info["org"]), start=query.get("start"), end=query.get("end"),
        group_by=query.get("group"), by=query.get("by") or None)


@routes.get("/api/orgs/{org}/report")
async def report(request: web.Request) -> web.Response:
    return web.json_response(await _report(request))


@routes.get("/api/orgs/{org}/report.csv")
async def report_csv(request: web.Request) -> web.Response:
    return csv_response(await _report(request))
