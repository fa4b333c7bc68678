"""Turning every failure into the right reply for who asked.

Typed `MeshError`s and aiohttp's own HTTP errors (404 route, 405, 413 body
too large) become, by path: OpenAI's error object under `/v1`, the REST error
object under `/api`, and an error page elsewhere -- each with its status from
the one table in `errors.py`. Anything else is a bug: logged with its
traceback, answered `INTERNAL` without details.
"""

from __future__ import annotations

from aiohttp import web

from shared.errors import (Forbidden, Internal, InvalidParams, MeshError, NotFound,
                           TooLarge, Unauthenticated)
from shared.logging import get_logger
from services.web.errors import error_headers, openai_error, rest_error, status_of
from services.web.ratelimits import facts_of, openai_headers
from services.web.session import Handler
from services.web.views import render

__all__ = ["error_middleware", "as_mesh_error"]

log = get_logger(__name__)


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


def _reply(request: web.Request, exc: MeshError) -> web.StreamResponse:
    if request.path.startswith("/v1/") or request.path == "/v1":
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
            log.error("upstream internal error", path=request.path, code=exc.code)
        return _reply(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        mapped = as_mesh_error(exc)
        if mapped is None:
            raise
        return _reply(request, mapped)
    except ConnectionResetError:  # the client left mid-reply: nobody to answer
        raise
    except Exception:
        log.exception("unhandled error", path=request.path)
        return _reply(request, Internal())
