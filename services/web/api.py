"""The REST API (JSON), for scripts and other front ends.

    POST   /api/auth/register        {username, email, password}            -> 201 {username, email, tier,
                                     is_admin, message}: the same whether the email was new or not
    POST   /api/auth/login           {username_or_email, password}          -> {token, expires_at, user}
    POST   /api/auth/logout          Bearer token                           -> {logged_out}
    POST   /api/auth/logout-all      Bearer token                           -> {logged_out, everywhere}
    POST   /api/auth/password        Bearer token, {old_password, new_password} -> {token, expires_at, user}
    GET    /api/auth/api-keys        Bearer token                           -> {keys: [...]}
    POST   /api/auth/api-keys        Bearer token, {name, expires_in_days? | expires_at?, allowed_models?,
                                     limits?, org? (an organisation's id or name)} -> 201 key (api_key shown once)
    PATCH  /api/auth/api-keys/{id}   Bearer token, {name?, expires_at? (null: never), allowed_models? (null:
                                     every model), limits? (a limit null: none; one left out: kept)}: fields
                                     left out are kept                      -> the key as it now is
    GET    /api/budget               Bearer token                           -> the account (auth.me): its
                                     `budget`, effective `limits`, `currency`
    PUT    /api/budget               Bearer token, {spend_per_day?, spend_per_month? (null: none), user?
                                     (admins)}: one left out is kept        -> the account as GET shows it
    DELETE /api/auth/api-keys/{id}   Bearer token                           -> the revoked key
    POST   /api/auth/api-keys/{id}/rotate  Bearer token, {overlap_seconds?}  -> 201 the new key (api_key shown
                                     once) with `old_key`, whose expires_at is when it stops (default 24 h)
    GET    /api/usage?start&end      Bearer token                           -> per day and key, totals, costs
                                                                               per day/key/model (decimal strings)
    GET    /api/reports?start&end&group&by  Bearer token                    -> cost and usage per day|week|month,
                                                                               by model|key (auth.report)
    GET    /api/reports.csv?...      Bearer token                           -> the same rows as a CSV download
    GET    /api/admin/top-spenders?start&end&limit  Bearer token (an admin) -> users ranked by cost per currency
    GET    /api/audit?user&action&since&until&limit&before_id  Bearer token -> {events, next_before_id}: the
                                     caller's own events, newest first (an admin's: everyone's, or `user`'s)
    GET    /api/prices?model         Bearer token                           -> {prices: [...]}: in force now and
                                                                               scheduled, money as decimal strings
    POST   /api/prices               Bearer token (an admin), {model, input, output, cached?, currency?,
                                     effective_from?}                       -> 201 the new price version
    GET    /api/tiers                Bearer token                           -> {tiers: [{name, limits, priority,
                                                                               edited}]}: budgets as decimal strings
    PATCH  /api/tiers/{name}         Bearer token (an admin), {requests_per_hour?, requests_per_month?,
                                     tokens_per_month?, spend_per_day?, spend_per_month? (null: no limit),
                                     priority?}: fields left out are kept  -> the tier as it now is
    GET    /api/settings             Bearer token                           -> {default_model, fallback_models,
                                                                               cache_ttl, updated_at}
    PATCH  /api/settings             Bearer token (an admin), {default_model?, fallback_models?, cache_ttl?}
                                     (null clears; [] no fallback); fields left out are kept -> as GET shows them
    GET/PUT/DELETE /api/webhook, POST /api/webhook/rotate, GET /api/webhook/deliveries, GET /api/alerts:
                                     spending alerts and their webhook (webhook_api.py)
    GET    /api/quota                Bearer token or X-API-Key              -> limits, remaining, reset
    GET    /api/receipts/keys        --                                     -> ["<hex key>", ...]: the live
                                     gateways' public keys, which sign usage receipts
    POST   /api/inference            X-API-Key, {model, messages | prompt, max_tokens, temperature,
                                     top_p, stop, seed, logprobs?, top_logprobs?, stream?, fallback?}
                                     (or `x-inferswarm-fallback: false`)    -> completion, or NDJSON chunks
                                                                               (the last with `receipt`);
                                                                               `model` the one that served,
                                                                               `tried` those that failed first

Organisations: org_api.py (`/api/orgs...`, `/api/invites...`).

Sessions here are the token of `/api/auth/login` in `Authorization: Bearer`;
cookies are never read, so no cross-site page can act through this API.
Errors: `{"error": {"code", "message"}}` with the status of the error table.
Money is a decimal string ("0.150000"): JSON has no decimal type. A price, a
budget or a key's money limit may be sent as a string or a JSON number; a number
is taken as written (never through a float), so 0.15 is exactly 0.15. `limits`
is a map of `requests_per_hour`, `requests_per_month`, `tokens_per_month`
(whole numbers), `spend_per_day`, `spend_per_month` (money) to values; auth
checks each and names a refused one.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Literal, overload

from aiohttp import web

from shared.errors import DecodeError, InvalidParams, MeshError, Unauthenticated
from shared.tiers import LIMIT_NAMES
from services.web.errors import MISSING_CREDENTIAL, rest_error_body
from services.web.ratelimits import openai_headers
from services.web.params import fallback_of, generation_params
from services.web.relay import Relay
from services.web.report_views import csv_response
from services.web.security import client_addr
from services.web.session import UPSTREAM

__all__ = ["routes", "json_body", "known_fields", "bearer", "api_key_of", "whole"]

routes = web.RouteTableDef()


async def json_body(request: web.Request, *, exact: bool = False) -> dict[str, Any]:
    """The request's JSON object; DECODE_ERROR (400) for anything else.

    Only as `Content-Type: application/json`: a page on another site can
    POST `text/plain` or a form without asking first (no CORS preflight), so
    a body of any other type could be someone else's forged request.
    """
    if request.content_type != "application/json":
        raise DecodeError("send the body as JSON, with Content-Type: application/json",
                          {"content_type": request.content_type[:64]})
    # `exact`: a JSON number with a fraction stays the text it was written as (money).
    loads = functools.partial(json.loads, parse_float=str) if exact else json.loads
    try:
        body = await request.json(loads=loads)
    except ValueError:
        raise DecodeError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise DecodeError("the body must be a JSON object")
    return body


@overload
def _string(body: dict[str, Any], name: str, *, required: Literal[True] = True) -> str: ...


@overload
def _string(body: dict[str, Any], name: str, *, required: bool) -> str | None: ...


def _string(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise InvalidParams(f"{name} must be a non-empty string", {"param": name})
    return value


def bearer(request: web.Request) -> str:
    """The credential of `Authorization: Bearer ...`; UNAUTHENTICATED without one."""
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthenticated("missing Authorization: Bearer <token>", {"reason": MISSING_CREDENTIAL})
    return credential.strip()


def api_key_of(request: web.Request) -> str:
    key = request.headers.get("X-API-Key", "").strip()
    if not key:
        raise Unauthenticated("missing X-API-Key header")
    return key


@routes.post("/api/auth/register")
async def register(request: web.Request) -> web.Response:
    body = await json_body(request)
    user = await request.app[UPSTREAM].auth.register(
        username=_string(body, "username"), email=_string(body, "email"),
        password=_string(body, "password"), client_addr=client_addr(request))
    return web.json_response(user, status=201)


@routes.post("/api/auth/login")
async def login(request: web.Request) -> web.Response:
    body = await json_body(request)
    identifier = body.get("username_or_email") or body.get("username") or body.get("email")
    if not isinstance(identifier, str) or not identifier:
        raise InvalidParams("username_or_email must be a non-empty string", {"param": "username_or_email"})
    answer = await request.app[UPSTREAM].auth.login(
        username_or_email=identifier, password=_string(body, "password"),
        client_addr=client_addr(request))
    return web.json_response(answer)


@routes.post("/api/auth/logout")
async def logout(request: web.Request) -> web.Response:
    answer = await request.app[UPSTREAM].auth.logout(token=bearer(request))
    return web.json_response(answer)


@routes.post("/api/auth/logout-all")
async def logout_all(request: web.Request) -> web.Response:
    answer = await request.app[UPSTREAM].auth.logout_all(token=bearer(request))
    return web.json_response(answer)


@routes.post("/api/auth/password")
async def change_password(request: web.Request) -> web.Response:
    token = bearer(request)
    body = await json_body(request)
    answer = await request.app[UPSTREAM].auth.change_password(
        token=token, old_password=_string(body, "old_password"),
        new_password=_string(body, "new_password"), client_addr=client_addr(request))
    return web.json_response(answer)


@routes.get("/api/auth/api-keys")
async def list_keys(request: web.Request) -> web.Response:
    keys = await request.app[UPSTREAM].auth.list_keys(token=bearer(request))
    return web.json_response({"keys": keys})


@routes.post("/api/auth/api-keys")
async def create_key(request: web.Request) -> web.Response:
    token = bearer(request)
    body = await json_body(request, exact=True)
    known_fields(body, {"name", "expires_in_days", "expires_at", "allowed_models", "limits", "org"})
    days = body.get("expires_in_days")
    if days is not None and type(days) is not int:
        raise InvalidParams("expires_in_days must be an integer", {"param": "expires_in_days"})
    org = body.get("org")  # an organisation's id or name (auth checks it); absent: a personal key
    if org is not None and type(org) not in (int, str):
        raise InvalidParams("org must be an organisation's id or name", {"param": "org"})
    key = await request.app[UPSTREAM].auth.create_key(
        token=token, name=_string(body, "name"), expires_in_days=days,
        expires_at=_string(body, "expires_at", required=False), allowed_models=_models(body),
        limits=_limits(body), org=org)
    return web.json_response(key, status=201)


@routes.patch("/api/auth/api-keys/{key_id}")
async def update_key(request: web.Request) -> web.Response:
    """Edit a key: a field present (null included) is changed, one left out is kept."""
    token = bearer(request)
    key_id = _key_id(request)
    body = await json_body(request, exact=True)
    known_fields(body, {"name", "expires_at", "allowed_models", "limits"})
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = _string(body, "name")
    if "expires_at" in body:
        changes["expires_at"] = _string(body, "expires_at", required=False)
    if "allowed_models" in body:
        changes["allowed_models"] = _models(body)
    if "limits" in body:
        changes["limits"] = _limits(body)  # null is auth's to refuse, by name, as over RPC
    key = await request.app[UPSTREAM].auth.update_key(token=token, key_id=key_id, **changes)
    return web.json_response(key)


def known_fields(body: dict[str, Any], names: set[str]) -> None:
    """Refuse a body with a field not in `names`, naming it (INVALID_PARAMS, a 400)."""
    unknown = sorted(set(body) - names)
    if unknown:
        raise InvalidParams(f"unknown field {unknown[0][:64]!r}", {"param": unknown[0][:64]})


def _models(body: dict[str, Any]) -> list[str] | None:
    """`allowed_models`: a list of names (auth checks each), or null/absent for every model."""
    value = body.get("allowed_models")
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise InvalidParams("allowed_models must be a list of model names, or null", {"param": "allowed_models"})
    return value


def _limits(body: dict[str, Any]) -> dict[str, Any] | None:
    """`limits`: an object (auth checks its names and values), or null/absent for none."""
    value = body.get("limits")
    if value is not None and not isinstance(value, dict):
        raise InvalidParams("limits must be an object such as {\"requests_per_hour\": 100}", {"param": "limits"})
    return value


@routes.get("/api/budget")
async def budget(request: web.Request) -> web.Response:
    return web.json_response(await request.app[UPSTREAM].auth.me(token=bearer(request)))


@routes.put("/api/budget")
async def set_budget(request: web.Request) -> web.Response:
    """Set the caller's budgets (an admin: `user`'s): a field present (null included) is changed."""
    token = bearer(request)
    body = await json_body(request, exact=True)
    known_fields(body, {"spend_per_day", "spend_per_month", "user"})
    user = body.get("user")
    if user is not None and not (isinstance(user, str) or type(user) is int):
        raise InvalidParams("user must be an id, a username or an email", {"param": "user"})
    amounts = {name: _amount(body, name, required=False) for name in ("spend_per_day", "spend_per_month")
               if name in body}
    account = await request.app[UPSTREAM].auth.set_budget(token=token, user=user, **amounts)
    return web.json_response(account)


def _key_id(request: web.Request) -> int:
    text = request.match_info["key_id"]
    if not text.isdigit() or len(text) > 18:
        raise InvalidParams("the key id must be a positive integer", {"param": "key_id"})
    return int(text)


@routes.delete("/api/auth/api-keys/{key_id}")
async def revoke_key(request: web.Request) -> web.Response:
    token = bearer(request)
    key = await request.app[UPSTREAM].auth.revoke_key(token=token, key_id=_key_id(request))
    return web.json_response(key)


@routes.post("/api/auth/api-keys/{key_id}/rotate")
async def rotate_key(request: web.Request) -> web.Response:
    token = bearer(request)
    key_id = _key_id(request)
    body = await json_body(request)
    known_fields(body, {"overlap_seconds"})
    overlap = body.get("overlap_seconds")
    if overlap is not None and type(overlap) is not int:
        raise InvalidParams("overlap_seconds must be an integer (seconds)", {"param": "overlap_seconds"})
    key = await request.app[UPSTREAM].auth.rotate_key(token=token, key_id=key_id, overlap_seconds=overlap)
    return web.json_response(key, status=201)


@routes.get("/api/usage")
async def usage(request: web.Request) -> web.Response:
    report = await request.app[UPSTREAM].auth.usage(token=bearer(request), start=request.query.get("start"),
                                                    end=request.query.get("end"))
    return web.json_response(report)


async def _report(request: web.Request) -> Any:
    query = request.query
    return await request.app[UPSTREAM].auth.report(
        token=bearer(request), start=query.get("start"), end=query.get("end"), group_by=query.get("group"),
        by=query.get("by") or None)


@routes.get("/api/reports")
async def report(request: web.Request) -> web.Response:
    return web.json_response(await _report(request))


@routes.get("/api/reports.csv")
async def report_csv(request: web.Request) -> web.Response:
    return csv_response(await _report(request))


@routes.get("/api/admin/top-spenders")
async def top_spenders(request: web.Request) -> web.Response:
    text = request.query.get("limit")
    if text is not None and (not text.isdigit() or len(text) > 6):
        raise InvalidParams("limit must be a whole number from 1 to 100", {"param": "limit"})
    answer = await request.app[UPSTREAM].auth.top_spenders(
        token=bearer(request), start=request.query.get("start"), end=request.query.get("end"),
        limit=None if text is None else int(text))
    return web.json_response(answer)


@routes.get("/api/audit")
async def audit(request: web.Request) -> web.Response:
    query = request.query
    page = await request.app[UPSTREAM].auth.audit(
        token=bearer(request), user=query.get("user") or None, action=query.get("action") or None,
        since=query.get("since") or None, until=query.get("until") or None,
        limit=whole(query.get("limit"), "limit"), before_id=whole(query.get("before_id"), "before_id"))
    return web.json_response(page)


def whole(text: str | None, name: str) -> int | None:
    """A query's whole number (None when absent), refused by name when it is not one."""
    if text is None or text == "":
        return None
    if not text.isdigit() or len(text) > 19:
        raise InvalidParams(f"{name} must be a whole number", {"param": name})
    return int(text)


@routes.get("/api/prices")
async def prices(request: web.Request) -> web.Response:
    listed = await request.app[UPSTREAM].auth.prices(token=bearer(request), model=request.query.get("model"))
    return web.json_response({"prices": listed})


@routes.post("/api/prices")
async def set_price(request: web.Request) -> web.Response:
    token = bearer(request)
    body = await json_body(request, exact=True)
    known_fields(body, {"model", "input", "output", "cached", "currency", "effective_from"})
    price = await request.app[UPSTREAM].auth.set_price(
        token=token, model=_string(body, "model"), input=_amount(body, "input"), output=_amount(body, "output"),
        cached=_amount(body, "cached", required=False), currency=_string(body, "currency", required=False),
        effective_from=_string(body, "effective_from", required=False))
    return web.json_response(price, status=201)


@routes.get("/api/tiers")
async def tiers(request: web.Request) -> web.Response:
    return web.json_response({"tiers": await request.app[UPSTREAM].auth.tiers(token=bearer(request))})


@routes.patch("/api/tiers/{name}")
async def set_tier_limits(request: web.Request) -> web.Response:
    """Admins: the limits given change (money as written, never through a float), the others are kept."""
    token = bearer(request)
    body = await json_body(request, exact=True)
    known_fields(body, {*LIMIT_NAMES, "priority"})
    limits = {name: body[name] for name in LIMIT_NAMES if name in body}
    tier = await request.app[UPSTREAM].auth.set_tier_limits(
        token=token, name=request.match_info["name"], limits=limits, priority=body.get("priority"))
    return web.json_response(tier)


@routes.get("/api/settings")
async def settings(request: web.Request) -> web.Response:
    return web.json_response(await request.app[UPSTREAM].auth.settings(token=bearer(request)))


@routes.patch("/api/settings")
async def set_settings(request: web.Request) -> web.Response:
    """Admins: the settings given change, the others are kept; auth checks each and names a refused one
    (an unknown field too)."""
    token = bearer(request)
    body = await json_body(request)
    return web.json_response(await request.app[UPSTREAM].auth.set_settings(token=token, settings=body))


def _amount(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    """Money as its decimal text, for auth to check (a whole number of any size too)."""
    value = body.get(name)
    if value is None and not required:
        return None
    if type(value) is int:
        return str(value)
    if not isinstance(value, str):
        raise InvalidParams(f"{name} must be a decimal number such as \"0.15\"", {"param": name})
    return value


@routes.get("/api/quota")
async def quota(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    if request.headers.get("X-API-Key"):
        answer = await upstream.gateway.quota(api_key=api_key_of(request))
    else:
        answer = await upstream.gateway.quota(token=bearer(request))
    return web.json_response(answer)


@routes.get("/api/receipts/keys")
async def receipt_keys(request: web.Request) -> web.Response:
    """The public keys (hex) of the live gateways, which sign usage receipts (shared/receipts.py)."""
    return web.json_response(await request.app[UPSTREAM].gateway_keys())


@routes.post("/api/inference")
async def inference(request: web.Request) -> web.StreamResponse:
    api_key = api_key_of(request)
    body = await json_body(request)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidParams("stream must be true or false", {"param": "stream"})
    generation, _ = generation_params(body, drop_unsupported=False, chat=None)
    params = {"api_key": api_key, "model": _string(body, "model"), **generation, "stream": stream}
    if not fallback_of(request, body):
        params["fallback"] = False
    relay = await Relay.start(request.app[UPSTREAM], params)
    try:
        if not stream:
            text = await relay.collect()
            calls = {"tool_calls": relay.calls} if relay.calls else {}
            logprobs = {"logprobs": relay.logprobs} if generation.get("logprobs") else {}
            return web.json_response({"text": text, **calls, **logprobs, **_final_view(relay)},
                                     headers=openai_headers(relay.facts))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                               **openai_headers(relay.facts)})
        await response.prepare(request)
        try:
            async for chunk in relay.outputs():
                await response.write(json.dumps(chunk).encode() + b"\n")
            last: dict[str, Any] = {"done": True, **_final_view(relay)}
        except MeshError as exc:  # after the status line: the error ends the stream in-band
            last = {"error": rest_error_body(exc)}
        await response.write(json.dumps(last).encode() + b"\n")
        await response.write_eof()
        return response
    finally:
        await relay.close()


def _final_view(relay: Relay) -> dict[str, Any]:
    final = relay.final
    tried = {"tried": final["tried"]} if isinstance(final.get("tried"), list) else {}
    return {"model": final.get("model") or relay.model, **tried, "finish_reason": relay.finish_reason,
            "usage": relay.usage,
            "request_id": final.get("request_id"), "cached": bool(final.get("cached")),
            "timing": final.get("timing"), "rate_limits": relay.facts or None, "receipt": relay.receipt}
