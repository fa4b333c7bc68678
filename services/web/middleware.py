"""Turning every failure into the right reply for who asked; the `/v1` request id.

Typed `MeshError`s and aiohttp's own HTTP errors (404 route, 405, 413 body
too large) become, by path: OpenAI's error object under `/v1`, the REST error
object under `/api`, and an error page elsewhere -- each with its status from
the one table in `errors.py`. Under `/v1` a URL no route has is OpenAI's 404
`unknown_url` and a route asked with the wrong method OpenAI's 405 (with
`Allow`), both JSON, so an SDK or `curl` reads why. Anything else is a bug:
logged with its traceback, answered `INTERNAL` without details.

Every `/v1` reply carries `x-request-id`: the gateway's id of the inference
when there is one (set by the handler from the stream, or from an error's
data), else one made here (`req_` + 32 hex digits) -- what a user quotes
when asking what happened to a request. A client's own `X-Client-Request-Id`
(printable ASCII, at most 512 characters) is echoed back. A client's
`X-Request-Id` is not taken: the id is the server's, as at OpenAI.
"""

from __future__ import annotations

import re
import secrets

from aiohttp import web
from structlog.contextvars import bind_contextvars

from shared.errors import (Forbidden, Internal, InvalidParams, MeshError, NotFound,
                           TooLarge, Unauthenticated)
from shared.logging import get_logger
from services.web.errors import (UNKNOWN_URL, MethodNotAllowed, error_headers, openai_error, rest_error,
                                 status_of)
from services.web.ratelimits import facts_of, openai_headers
from services.web.session import Handler
from services.web.views import render

__all__ = ["error_middleware", "as_mesh_error", "is_v1", "request_id_of", "add_request_id",
           "REQUEST_ID", "CLIENT_REQUEST_ID"]

log = get_logger(__name__)

REQUEST_ID = "x-request-id"
CLIENT_REQUEST_ID = "x-client-request-id"
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,512}")  # printable ASCII, no spaces: safe to echo in a header
_URL_SHOWN = 200  # characters of an unknown URL repeated in the message


def is_v1(path: str) -> bool:
    """The OpenAI-compatible API's paths."""
    return path == "/v1" or path.startswith("/v1/")


def as_mesh_error(exc: web.HTTPException) -> MeshError | None:
    """The typed error for one of aiohttp's HTTP errors (None: pass it through as is)."""
    if exc.status == 413:
        limit = exc.text or "the request body is too large"
        return TooLarge(limit)
    if exc.status == 404:
        return NotFound(exc.text if exc.text and exc.text != "404: Not Found" else "no such route")
    if exc.status == 401:
        return Unauthenticated(exc.text or "unauthenticated")
    if exc.status == 403:
        return Forbidden(exc.text or "forbidden")
    if exc.status == 400:
        return InvalidParams(exc.text or "bad request")
    return None


def _v1_route_error(request: web.Request, exc: web.HTTPException) -> MeshError | None:
    """OpenAI's replies for a `/v1` request the router could not place (else None)."""
    if request.match_info.http_exception is None:
        return None  # a handler ran: its own 404 (an unknown model...) is a typed error already
    asked = f"{request.method} {request.path}"[:_URL_SHOWN]
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"Invalid method for URL ({asked})", {"allow": sorted(exc.allowed_methods)})
    if exc.status == 404:
        return NotFound(f"Unknown request URL: {asked}. Please check the URL for typos; the routes are "
                        "GET /v1/models, GET /v1/models/{model}, POST /v1/chat/completions, "
                        "POST /v1/completions and POST /v1/responses.", {"reason": UNKNOWN_URL})
    return None


def _reply(request: web.Request, exc: MeshError) -> web.StreamResponse:
    if is_v1(request.path):
        return openai_error(exc, openai_headers(facts_of(exc.data)))
    if request.path.startswith("/api/"):
        return rest_error(exc, openai_headers(facts_of(exc.data)))
    response = render(request, "error.html", status=status_of(exc), error=exc,
                      internal=exc.code == "INTERNAL")
    response.headers.update(error_headers(exc))
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MeshError as exc:
        if not exc.expected:
            log.error("upstream internal error", path=request.path, code=exc.code,
                      request_id=exc.data.get("request_id"))
        return _reply(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        mapped = (_v1_route_error(request, exc) if is_v1(request.path) else None) or as_mesh_error(exc)
        if mapped is None:
            raise
        return _reply(request, mapped)
    except ConnectionResetError:  # the client left mid-reply: nobody to answer
        raise
    except Exception:
        log.exception("unhandled error", path=request.path, request_id=request_id_of(request))
        return _reply(request, Internal())


def request_id_of(request: web.Request) -> str:
    """This request's own id (made once, on first use), for replies without the gateway's."""
    request_id = request.get(REQUEST_ID)
    if request_id is None:
        request_id = request[REQUEST_ID] = "req_" + secrets.token_hex(16)
    return request_id


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: `x-request-id` on every `/v1` reply (see the module doc)."""
    if not is_v1(request.path):
        return
    # Bound to the log lines still to come (a streamed reply's): see traces.py.
    bind_contextvars(request_id=response.headers.setdefault(REQUEST_ID, request_id_of(request)))
    client_id = request.headers.get(CLIENT_REQUEST_ID)
    if client_id is not None and _CLIENT_ID.fullmatch(client_id):
        response.headers[CLIENT_REQUEST_ID] = client_id
