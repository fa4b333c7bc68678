"""Who is looking at a page: the session cookie, checked, and the account behind it.

A page handler decorated with `login_required` runs with `request["token"]`
(the session JWT) and `request["me"]` (auth's view of the account, from
`auth.me`, so a disabled account is logged out at its next page). Without a
valid session the browser is sent to the login page, which brings it back.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from shared.errors import MeshError, Unauthenticated
from services.web.errors import error_headers, status_of
from services.web.security import SESSION_COOKIE, clear_session
from services.web.upstream import Upstream
from services.web.views import ME, TOKEN, render

__all__ = ["UPSTREAM", "TOKEN", "ME", "Handler", "load_session", "login_required", "admin_only", "safe_next",
           "login_redirect", "field_errors", "form_errors", "refused_form"]

UPSTREAM = web.AppKey("upstream", Upstream)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def load_session(request: web.Request) -> bool:
    """Fill `request["token"]` and `request["me"]` from a valid session cookie."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return False
    upstream = request.app[UPSTREAM]
    try:
        await upstream.verify_token(token)  # local: no RPC for an expired or forged cookie
        me = await upstream.auth.me(token=token)
    except Unauthenticated:
        return False
    request[TOKEN], request[ME] = token, me
    return True


#: A path on this site: one slash, then no second slash or backslash, and only
#: URL characters -- no tab, newline or other control character, which browsers
#: strip before parsing (`/\t/evil.example` is `//evil.example` to them).
_SAME_SITE_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9/_.~?=&%+:@!$'()*,;#-]*")


def safe_next(target: str | None, default: str = "/dashboard") -> str:
    """A same-site path to go back to; anything else (`//evil`, `https:`, `/\t/evil`,
    `/%2F/evil`, `/\\evil`) is the default."""
    if not target or not _SAME_SITE_PATH.fullmatch(target) or target[:4].lower() in ("/%2f", "/%5c"):
        return default
    return target


def admin_only(request: web.Request) -> None:
    """403 unless the logged-in user is an administrator (after `login_required`)."""
    if not request[ME].get("is_admin"):
        raise web.HTTPForbidden(text="administrators only")


def login_redirect(request: web.Request) -> web.Response:
    """To the login page, coming back here afterwards; a dead session cookie is dropped."""
    target = request.path_qs if request.method == "GET" else request.path
    response = web.Response(status=303, headers={"Location": f"/login?next={quote(target, safe='/')}"})
    if request.cookies.get(SESSION_COOKIE):
        clear_session(response, request)
    return response


def login_required(handler: Handler) -> Handler:
    """Run `handler` only for a logged-in browser; send others to the login page."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        if not await load_session(request):
            return login_redirect(request)
        try:
            return await handler(request)
        except Unauthenticated:  # the session ended while we worked (expiry, disabled account)
            return login_redirect(request)

    return wrapper


#: What a form says when auth refused it for a while, by the refusal's `reason`.
_RATE_LIMITED = {
    "busy": "The server is busy",
    "registrations": "Too many registrations",
}


def form_errors(exc: MeshError, fields: tuple[str, ...]) -> dict[str, str]:
    """A refused form's errors: a rate limit says when to try again, others go by field."""
    if exc.code == "RATE_LIMITED":
        why = _RATE_LIMITED.get(exc.data.get("reason"), "Too many failed attempts")
        return {"_form": f"{why}: try again in {error_headers(exc)['Retry-After']} s"}
    return field_errors(exc, fields)


def refused_form(request: web.Request, template: str, exc: MeshError, errors: dict[str, str],
                 **context: Any) -> web.Response:
    """The form again, with its errors, the error's status and headers (e.g. `Retry-After`)."""
    response = render(request, template, status=status_of(exc), errors=errors, **context)
    response.headers.update(error_headers(exc))
    return response


def field_errors(exc: Any, fields: tuple[str, ...], rename: dict[str, str] | None = None) -> dict[str, str]:
    """Put an error that names a parameter next to its field, else under `_form`."""
    param = exc.data.get("param") if hasattr(exc, "data") else None
    param = (rename or {}).get(param, param)
    return {param if param in fields else "_form": exc.message}
