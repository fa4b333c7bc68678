"""One trace per HTTP request: its id on every log line, and its SERVER span.

The trace id is the caller's when the request carries a valid W3C
`traceparent` header, else a new one; a malformed, all-zero or oversized
header is ignored, never an error. It is bound to every log line of the
request, and every RPC call the request makes carries it on (with this span
as the parent), so the web's, the gateway's, the worker's and auth's spans
and logs share one trace id. Under `/v1` the reply's `x-request-id` is bound
too (`request_id`) as soon as it is known: when a streamed reply's headers
are sent (middleware.py `add_request_id`), else when the handler returns.

With tracing on (shared/tracing.py) the request is a SERVER span named
`<method> <route template>`, with `http.request.method`, `http.route` and
`http.response.status_code`; a 5xx reply or an exception marks it failed.
"""

from __future__ import annotations

import time

from aiohttp import web
from structlog.contextvars import bind_contextvars, reset_contextvars

from shared import tracing
from shared.logging import get_logger, new_trace_id
from services.web.middleware import REQUEST_ID, is_v1, request_id_of
from services.web.session import Handler

__all__ = ["trace_middleware", "TRACEPARENT"]

log = get_logger(__name__)

TRACEPARENT = "traceparent"


def _route(request: web.Request) -> str:
    """The matched route's template (`/v1/models/{model}`), "" when none matched."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else ""


@web.middleware
async def trace_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    parent = tracing.parse_traceparent(request.headers.get(TRACEPARENT))
    trace_id = parent.trace_id if parent is not None else new_trace_id()
    tokens = bind_contextvars(trace_id=trace_id)
    span = None
    if tracing.tracer is not None:
        span = tracing.start_http_server(request.method, _route(request), parent, trace_id)
    started = time.perf_counter()
    status, error = 0, None
    try:
        response = await handler(request)
        status = response.status
        if is_v1(request.path):  # what add_request_id will put in the reply, if not there yet
            bind_contextvars(request_id=response.headers.get(REQUEST_ID) or request_id_of(request))
        return response
    except web.HTTPException as exc:  # redirects, and errors error_middleware leaves to aiohttp
        status = exc.status
        raise
    except BaseException as exc:  # the client left (cancelled), or a bug aiohttp answers 500
        error = tracing.error_code(exc)
        raise
    finally:
        if status >= 500:
            error = str(status)
        if span is not None:
            tracing.finish(span, error, {"http.response.status_code": status} if status else None)
        log.debug("http request", method=request.method, path=request.path, status=status or None,
                  error=error, ms=round((time.perf_counter() - started) * 1000, 3))
        reset_contextvars(**tokens)
