"""The REST API of spending alerts and their webhook (JSON; sessions as in api.py: `Authorization: Bearer`).

    GET    /api/webhook?user             Bearer token    -> {url, thresholds, created_at, updated_at}; 404 when
                                                            none (an admin may name `user`)
    PUT    /api/webhook                  Bearer token, {url, thresholds?}
                                                         -> 201 {..., secret} when created (the secret shown once),
                                                            200 {..., secret: null} when changed (secret kept)
    DELETE /api/webhook                  Bearer token    -> {removed}
    POST   /api/webhook/rotate           Bearer token    -> {..., secret}: a new secret, shown once
    GET    /api/webhook/deliveries?limit&before_id&user  -> {deliveries: [...], next_before_id}
    GET    /api/alerts?limit&user        Bearer token    -> {alerts: [...]}: the latest spending alerts

services/auth/README.md, "Spending alerts and webhooks", has the rules and the
signature's format.
"""

from __future__ import annotations

from aiohttp import web

from shared.errors import InvalidParams
from services.web.api import bearer, json_body, known_fields, whole
from services.web.session import UPSTREAM

__all__ = ["routes"]

routes = web.RouteTableDef()


def _user(request: web.Request) -> str | None:
    return request.query.get("user") or None


@routes.get("/api/webhook")
async def webhook(request: web.Request) -> web.Response:
    hook = await request.app[UPSTREAM].auth.webhook(token=bearer(request), user=_user(request))
    return web.json_response(hook)


@routes.put("/api/webhook")
async def set_webhook(request: web.Request) -> web.Response:
    token = bearer(request)
    body = await json_body(request)
    known_fields(body, {"url", "thresholds"})
    url, thresholds = body.get("url"), body.get("thresholds")
    if not isinstance(url, str):
        raise InvalidParams("url must be a string", {"param": "url"})
    if thresholds is not None and not isinstance(thresholds, list):
        raise InvalidParams("thresholds must be a list of percentages such as [50, 80, 100]",
                            {"param": "thresholds"})
    hook = await request.app[UPSTREAM].auth.set_webhook(token=token, url=url, thresholds=thresholds)
    return web.json_response(hook, status=201 if hook["secret"] else 200)


@routes.delete("/api/webhook")
async def remove_webhook(request: web.Request) -> web.Response:
    return web.json_response(await request.app[UPSTREAM].auth.remove_webhook(token=bearer(request)))


@routes.post("/api/webhook/rotate")
async def rotate_secret(request: web.Request) -> web.Response:
    return web.json_response(await request.app[UPSTREAM].auth.rotate_webhook_secret(token=bearer(request)))


@routes.get("/api/webhook/deliveries")
async def deliveries(request: web.Request) -> web.Response:
    page = await request.app[UPSTREAM].auth.webhook_deliveries(
        token=bearer(request), limit=whole(request.query.get("limit"), "limit"),
        before_id=whole(request.query.get("before_id"), "before_id"), user=_user(request))
    return web.json_response(page)


@routes.get("/api/alerts")
async def alerts(request: web.Request) -> web.Response:
    answer = await request.app[UPSTREAM].auth.alerts(token=bearer(request),
                                                     limit=whole(request.query.get("limit"), "limit"),
                                                     user=_user(request))
    return web.json_response(answer)
