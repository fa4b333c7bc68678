"""Cross-origin access to `/v1` for the browser origins the operator lists.

Off unless `INFERSWARM_WEB_CORS_ORIGINS` lists origins (`https://app.example.com`,
exact, comma-separated; `*` for any). Only the OpenAI-compatible API takes
part: it is called with a bearer API key, never a cookie, so no reply ever
carries `Access-Control-Allow-Credentials` and the dashboard and `/api` (whose
session cookie a cross-site page must not ride on) never get CORS headers.

* A preflight (`OPTIONS` under `/v1` with `Origin` and
  `Access-Control-Request-Method`) from a listed origin is answered 204 with
  `Access-Control-Allow-Origin` (that origin, or `*` when the list is `*`),
  `-Allow-Methods: GET, POST`, `-Allow-Headers` (those of the requested headers
  that are in `ALLOWED_HEADERS` or start with an `ALLOWED_PREFIXES` entry: what
  the OpenAI SDKs send), `-Max-Age` and `Vary: Origin`. A preflight from any
  other origin (or with CORS off) is 403, with no CORS header: the browser
  then refuses to send the request.
* A reply under `/v1` to a listed origin gets `Access-Control-Allow-Origin`,
  `Vary: Origin` and `Access-Control-Expose-Headers` (`EXPOSED_HEADERS`: the
  request id, the rate-limit headers, `Retry-After`), so a page reads them;
  errors and streams too. Other origins get nothing, so their pages cannot read
  the reply.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import hdrs, web

from shared.errors import Forbidden
from services.web.middleware import is_v1
from services.web.session import Handler

__all__ = ["CorsPolicy", "CORS", "cors_middleware", "add_cors_headers", "allowed_request_headers", "ALLOWED_HEADERS",
           "ALLOWED_PREFIXES", "EXPOSED_HEADERS", "ALLOWED_METHODS", "MAX_AGE"]

ALLOWED_METHODS = "GET, POST"
ALLOWED_HEADERS = frozenset({"authorization", "content-type", "accept", "x-client-request-id",
                             "idempotency-key"})
#: The OpenAI JS SDK's own headers (`x-stainless-os`, `-retry-count`, `-timeout`...) and OpenAI's
#: (`openai-organization`, `openai-project`, `openai-beta`).
ALLOWED_PREFIXES = ("x-stainless-", "openai-")
EXPOSED_HEADERS = ", ".join((
    "x-request-id", "x-client-request-id", "retry-after", "x-should-retry", "x-inferswarm-receipt",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
    "x-inferswarm-budget-limit", "x-inferswarm-budget-remaining", "x-inferswarm-budget-reset"))
MAX_AGE = "600"  #: seconds a browser may keep a preflight's answer (Chromium keeps at most 7200)


class CorsPolicy:
    """Which origins may call `/v1` from a browser (empty: none)."""

    def __init__(self, origins: Iterable[str]) -> None:
        listed = tuple(origins)
        self.any = "*" in listed
        self.origins = frozenset(origin for origin in listed if origin != "*")

    @property
    def enabled(self) -> bool:
        return self.any or bool(self.origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """The `Access-Control-Allow-Origin` value for a request's `Origin`, None if not allowed."""
        if origin is None:
            return None
        if origin in self.origins:
            return origin
        return "*" if self.any else None


CORS = web.AppKey("cors", CorsPolicy)


def allowed_request_headers(requested: str) -> str:
    """Those of `Access-Control-Request-Headers` this API accepts, lower case."""
    names = (name.strip().lower() for name in requested.split(","))
    return ", ".join(name for name in names
                     if name in ALLOWED_HEADERS or (name.startswith(ALLOWED_PREFIXES) and name.isascii()))


def _is_preflight(request: web.Request) -> bool:
    return (request.method == hdrs.METH_OPTIONS and hdrs.ORIGIN in request.headers
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers)


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers `/v1` preflights itself (see the module doc); every other request goes on."""
    if not (is_v1(request.path) and _is_preflight(request)):
        return await handler(request)
    allow = request.app[CORS].allow_origin(request.headers[hdrs.ORIGIN])
    if allow is None:
        raise Forbidden("this origin may not call the API from a browser (INFERSWARM_WEB_CORS_ORIGINS)")
    headers = {
        hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: allow,
        hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOWED_METHODS,
        hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE,
        hdrs.VARY: "Origin",
    }
    requested = allowed_request_headers(request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, ""))
    if requested:
        headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = requested
    return web.Response(status=204, headers=headers)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the CORS headers of a `/v1` reply to an allowed origin."""
    policy = request.app[CORS]
    if not policy.enabled or not is_v1(request.path) or _is_preflight(request):
        return
    _add_vary_origin(response)
    allow = policy.allow_origin(request.headers.get(hdrs.ORIGIN))
    if allow is not None:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allow
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS


def _add_vary_origin(response: web.StreamResponse) -> None:
    """`Vary: Origin` (a cache must not serve one origin's reply to another), kept with any other."""
    vary = response.headers.get(hdrs.VARY)
    if vary is None:
        response.headers[hdrs.VARY] = "Origin"
    elif "origin" not in (part.strip().lower() for part in vary.split(",")):
        response.headers[hdrs.VARY] = f"{vary}, Origin"
