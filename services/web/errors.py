"""The one table from RPC error codes to HTTP, and the JSON error bodies.

Every HTTP error the web service sends -- REST, OpenAI-compatible or a page --
takes its status from `STATUS` below; nothing else picks a status. The REST
body is ``{"error": {"code", "message"}}`` (plus `param` when a field is named,
`retry_after` when there is one); the `/v1` body is OpenAI's
``{"error": {"message", "type", "param", "code"}}``, so OpenAI SDKs raise their
usual classes (`AuthenticationError` on 401, `RateLimitError` on 429...).

| code              | HTTP | OpenAI `type`          |
| ----------------- | ---- | ---------------------- |
| INVALID_PARAMS    | 400  | invalid_request_error  |
| DECODE_ERROR      | 400  | invalid_request_error  |
| UNAUTHENTICATED   | 401  | authentication_error   |
| FORBIDDEN         | 403  | permission_error       |
| NOT_FOUND         | 404  | not_found_error        |
| METHOD_NOT_FOUND  | 501  | api_error              |
| CONFLICT          | 409  | conflict_error         |
| TOO_LARGE         | 413  | invalid_request_error  |
| RATE_LIMITED      | 429  | rate_limit_error       |  + `Retry-After` (whole seconds, rounded up)
| UNAVAILABLE       | 503  | service_unavailable    |  + `Retry-After: 1`
| TIMEOUT           | 504  | timeout_error          |
| CANCELLED         | 499  | api_error              |  (the client went away; nobody reads it)
| INTERNAL          | 500  | api_error              |
| any other code    | 502  | api_error              |  (a newer peer's code this version does not know)

METHOD_NOT_FOUND means a service of the mesh does not offer a method the web
service needs (an older version): "not implemented" rather than "not found".
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

from aiohttp import web

from shared.errors import MeshError, RemoteError

__all__ = ["HttpError", "STATUS", "http_error", "status_of", "retry_after_of", "error_headers",
           "rest_error", "rest_error_body", "openai_error_body", "openai_error"]


class HttpError(NamedTuple):
    status: int
    openai_type: str


STATUS: dict[str, HttpError] = {
    "INVALID_PARAMS": HttpError(400, "invalid_request_error"),
    "DECODE_ERROR": HttpError(400, "invalid_request_error"),
    "UNAUTHENTICATED": HttpError(401, "authentication_error"),
    "FORBIDDEN": HttpError(403, "permission_error"),
    "NOT_FOUND": HttpError(404, "not_found_error"),
    "METHOD_NOT_FOUND": HttpError(501, "api_error"),
    "CONFLICT": HttpError(409, "conflict_error"),
    "TOO_LARGE": HttpError(413, "invalid_request_error"),
    "RATE_LIMITED": HttpError(429, "rate_limit_error"),
    "UNAVAILABLE": HttpError(503, "service_unavailable"),
    "TIMEOUT": HttpError(504, "timeout_error"),
    "CANCELLED": HttpError(499, "api_error"),
    "INTERNAL": HttpError(500, "api_error"),
}
_UNKNOWN = HttpError(502, "api_error")

#: What a person or SDK reads for an INTERNAL error: details stay in the log.
INTERNAL_MESSAGE = "internal error"


def http_error(exc: MeshError) -> HttpError:
    code = exc.remote_code if isinstance(exc, RemoteError) else exc.code
    return STATUS.get(code, _UNKNOWN)


def status_of(exc: MeshError) -> int:
    """The HTTP status for a typed error, from the table."""
    return http_error(exc).status


def retry_after_of(exc: MeshError) -> int | None:
    """Whole seconds a client should wait (429 and 503), else None."""
    if exc.code == "RATE_LIMITED":
        value = exc.data.get("retry_after")
        seconds = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0
        return max(1, math.ceil(seconds))
    if exc.code == "UNAVAILABLE":
        return 1
    return None


def error_headers(exc: MeshError) -> dict[str, str]:
    retry = retry_after_of(exc)
    return {"Retry-After": str(retry)} if retry is not None else {}


def _message(exc: MeshError) -> str:
    return INTERNAL_MESSAGE if exc.code == "INTERNAL" else exc.message


def _wire_code(exc: MeshError) -> str:
    return exc.remote_code if isinstance(exc, RemoteError) else exc.code


def rest_error_body(exc: MeshError) -> dict[str, Any]:
    """`{"code", "message"}`, with `param` and `retry_after` when the error has them."""
    body: dict[str, Any] = {"code": _wire_code(exc), "message": _message(exc)}
    param = exc.data.get("param")
    if isinstance(param, str):
        body["param"] = param
    retry = retry_after_of(exc)
    if retry is not None:
        body["retry_after"] = retry
    return body


def rest_error(exc: MeshError, headers: dict[str, str] | None = None) -> web.Response:
    """A REST error reply: status from the table, `{"error": {"code", "message"}}`."""
    return web.json_response({"error": rest_error_body(exc)}, status=status_of(exc),
                             headers={**error_headers(exc), **(headers or {})})


def openai_error_body(exc: MeshError) -> dict[str, Any]:
    """OpenAI's error object; `code` is ours in lower case (`rate_limited`, `unauthenticated`)."""
    param = exc.data.get("param")
    return {"error": {"message": _message(exc), "type": http_error(exc).openai_type,
                      "param": param if isinstance(param, str) else None,
                      "code": _wire_code(exc).lower()}}


def openai_error(exc: MeshError, headers: dict[str, str] | None = None) -> web.Response:
    """A `/v1` error reply in OpenAI's shape, with the status from the table."""
    return web.Response(text=json.dumps(openai_error_body(exc)), status=status_of(exc),
                        content_type="application/json",
                        headers={**error_headers(exc), **(headers or {})})
