"""The web service's RED metrics: every HTTP request counted and timed, once.

`inferswarm_http_requests_total{route, method, code}` and
`inferswarm_http_request_duration_seconds{route, method}` (shared/metrics/families.py),
recorded by `metrics_middleware`, the outermost middleware: it sees every reply,
the error replies of `error_middleware` and the CORS preflights included.

* `route` is the matched route's template (`/v1/chat/completions`,
  `/api/auth/api-keys/{key_id}`), never the raw path; every static file is
  `/static/`; a request whose method its route has not (a CORS preflight, a
  405) has its route's template; one no route takes (404) is `other`. The router
  bounds the values; the family's shape and series cap bound them again.
* `method` is one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, else `other`.
* `code` is the status class sent, `1xx` .. `5xx`.
* The duration runs until the handler is done: for a streamed reply, the
  whole stream. A reply the handler returns unsent is timed without the send.
* A client that goes away is counted too: with the status already sent when
  the reply had started (a stream cut midway is a `2xx`), else as nginx's 499
  ("client closed request"), so in `4xx`.
"""

from __future__ import annotations

import time
from typing import Final

from aiohttp import web

from shared.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS, OTHER, Metrics
from services.web.session import Handler

__all__ = ["METRICS", "HttpMetrics", "metrics_middleware", "note_status", "route_of", "code_class",
           "CLIENT_LEFT", "STATIC"]

#: The status a request is counted with when its client left before any reply was sent.
CLIENT_LEFT: Final = 499
#: The one `route` of every static file.
STATIC: Final = "/static/"
_SENT = web.RequestKey("http_status_sent", int)  # the status of the reply once its headers went out


class HttpMetrics:
    """The two families' handles in this process's registry."""

    def __init__(self, metrics: Metrics) -> None:
        self._requests = metrics.counter(HTTP_REQUESTS)
        self._duration = metrics.histogram(HTTP_REQUEST_DURATION)

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        self._requests.inc(route=route, method=method, code=code_class(status))
        self._duration.observe(seconds, route=route, method=method)


METRICS = web.AppKey("http_metrics", HttpMetrics)


async def route_of(request: web.Request) -> str:
    """The template of the route that took the request (see the module doc)."""
    info = request.match_info
    if info.http_exception is None:
        resource = info.route.resource
    elif isinstance(info.http_exception, web.HTTPMethodNotAllowed):  # a CORS preflight, a wrong method
        resource = await _resource_of_path(request)
    else:
        resource = None
    if resource is None:
        return OTHER
    if isinstance(resource, web.StaticResource):
        return STATIC
    return resource.canonical


async def _resource_of_path(request: web.Request) -> web.AbstractResource | None:
    """The resource whose path the request has (the router keeps none when the method is not allowed)."""
    for resource in request.app.router.resources():
        _, allowed = await resource.resolve(request)
        if allowed:
            return resource
    return None


def code_class(status: int) -> str:
    """`2xx` for 200..299 and so on; `other` outside 100..599."""
    return f"{status // 100}xx" if 100 <= status <= 599 else OTHER


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    route = await route_of(request)  # before the handler: nothing to await once a client has left
    status: int | None = None  # None: the client left (a cancellation or a reset connection)
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # what error_middleware passes on (redirects...): aiohttp sends it
        status = exc.status
        raise
    except ConnectionResetError:
        raise
    except Exception:  # aiohttp answers 500
        status = 500
        raise
    finally:
        if status is None:
            status = request.get(_SENT, CLIENT_LEFT)
        request.app[METRICS].record(route, request.method, status, time.monotonic() - started)


async def note_status(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the status sent, for a request whose client then leaves."""
    request[_SENT] = response.status
