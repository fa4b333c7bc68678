"""The one table from RPC error codes to HTTP, and the JSON error bodies.

Every HTTP error the web service sends -- REST, OpenAI-compatible or a page --
takes its status from `STATUS` below; nothing else picks a status. The REST
body is ``{"error": {"code", "message"}}`` (plus `param` when a field is named,
`retry_after` when there is one); the `/v1` body is OpenAI's
``{"error": {"message", "type", "param", "code"}}``, so OpenAI SDKs raise their
usual classes (`AuthenticationError` on 401, `RateLimitError` on 429...).

| code               | HTTP | OpenAI `type` (default) |
| ------------------ | ---- | ----------------------- |
| INVALID_PARAMS     | 400  | invalid_request_error   |
| DECODE_ERROR       | 400  | invalid_request_error   |
| UNAUTHENTICATED    | 401  | invalid_request_error   |
| FORBIDDEN          | 403  | permission_error        |
| NOT_FOUND          | 404  | not_found_error         |
| METHOD_NOT_ALLOWED | 405  | invalid_request_error   |  (HTTP only: a route without that method)
| METHOD_NOT_FOUND   | 501  | api_error               |
| CONFLICT           | 409  | conflict_error          |
| TOO_LARGE          | 413  | invalid_request_error   |
| RATE_LIMITED       | 429  | requests                |  + `Retry-After` (whole seconds, rounded up)
| UNAVAILABLE        | 503  | service_unavailable     |  + `Retry-After: 1`
| TIMEOUT            | 504  | timeout_error           |
| CANCELLED          | 499  | api_error               |  (the client went away; nobody reads it)
| INTERNAL           | 500  | api_error               |
| any other code     | 502  | api_error               |  (a newer peer's code this version does not know)

METHOD_NOT_FOUND means a service of the mesh does not offer a method the web
service needs (an older version): "not implemented" rather than "not found".

The `/v1` `code` (and, where OpenAI has its own, `type`) is the one OpenAI
sends for the same case, read from the error's code and data; OpenAI SDKs and
the programs using them branch on it:

| error                                                    | HTTP  | `type`                | `code`                       |
| -------------------------------------------------------- | ----- | --------------------- | ---------------------------- |
| UNAUTHENTICATED (bad, revoked, expired key...)           | 401   | invalid_request_error | invalid_api_key              |
| UNAUTHENTICATED, no `Authorization: Bearer` at all       | 401   | invalid_request_error | null                         |
| NOT_FOUND naming a `model` (no worker serves it)         | 404   | invalid_request_error | model_not_found              |
| NOT_FOUND of the router (no such `/v1` URL)              | 404   | invalid_request_error | unknown_url                  |
| FORBIDDEN naming `model` (not in the key's allow-list)   | 403   | permission_error      | model_not_allowed            |
| METHOD_NOT_ALLOWED (+ `Allow`)                           | 405   | invalid_request_error | null                         |
| RATE_LIMITED by a budget (`requests_per_month`,          | 429   | insufficient_quota    | insufficient_quota           |
|   `tokens_per_month`, `spend_per_day`, `spend_per_month`):|      |                       |                              |
|   + `x-should-retry: false`                              |       |                       |                              |
| RATE_LIMITED otherwise (`requests_per_hour`)             | 429   | requests (tokens)     | rate_limit_exceeded          |
| INVALID_PARAMS, `data.reason` context_length_exceeded    | 400   | invalid_request_error | context_length_exceeded      |
| INVALID_PARAMS otherwise, DECODE_ERROR                   | 400   | invalid_request_error | null (`param` names it)      |
| any other                                                | table | table                 | ours, lower case (`timeout`) |

OpenAI's SDKs choose the exception class by status alone and keep `type` and
`code` as attributes; they retry 408, 409, 429 and 5xx unless the reply says
`x-should-retry: false` -- an exhausted monthly quota does not come back by
retrying, so it says so. The 429 `type` is OpenAI's name of the limited unit
(`requests` or `tokens`) rather than a class of error.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

from aiohttp import web

from shared.errors import MeshError, RemoteError
from services.web.ratelimits import QUOTA_COUNTERS

__all__ = ["HttpError", "STATUS", "MethodNotAllowed", "http_error", "status_of", "retry_after_of",
           "error_headers", "openai_kind", "openai_error_headers", "rest_error", "rest_error_body",
           "openai_error_body", "openai_error", "MISSING_CREDENTIAL", "UNKNOWN_URL", "CONTEXT_LENGTH"]


class HttpError(NamedTuple):
    status: int
    openai_type: str


class MethodNotAllowed(MeshError):
    """A route that exists, asked with another method; `data["allow"]` lists the right ones.

    HTTP only: never sent over RPC, so not one of `shared.errors`' classes."""

    code = "METHOD_NOT_ALLOWED"


STATUS: dict[str, HttpError] = {
    "INVALID_PARAMS": HttpError(400, "invalid_request_error"),
    "DECODE_ERROR": HttpError(400, "invalid_request_error"),
    "UNAUTHENTICATED": HttpError(401, "invalid_request_error"),
    "FORBIDDEN": HttpError(403, "permission_error"),
    "NOT_FOUND": HttpError(404, "not_found_error"),
    "METHOD_NOT_ALLOWED": HttpError(405, "invalid_request_error"),
    "METHOD_NOT_FOUND": HttpError(501, "api_error"),
    "CONFLICT": HttpError(409, "conflict_error"),
    "TOO_LARGE": HttpError(413, "invalid_request_error"),
    "RATE_LIMITED": HttpError(429, "requests"),
    "UNAVAILABLE": HttpError(503, "service_unavailable"),
    "TIMEOUT": HttpError(504, "timeout_error"),
    "CANCELLED": HttpError(499, "api_error"),
    "INTERNAL": HttpError(500, "api_error"),
}
_UNKNOWN = HttpError(502, "api_error")

#: What a person or SDK reads for an INTERNAL error: details stay in the log.
INTERNAL_MESSAGE = "internal error"

#: `data["reason"]` values that choose the `/v1` code (see the module doc).
MISSING_CREDENTIAL = "missing_credential"  #: no `Authorization: Bearer` header (services/web/api.py)
UNKNOWN_URL = "unknown_url"  #: the router found no route (middleware.py)
CONTEXT_LENGTH = "context_length_exceeded"  #: the prompt and max_tokens exceed the model's context (worker)


def http_error(exc: MeshError) -> HttpError:
    return STATUS.get(_wire_code(exc), _UNKNOWN)


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
    headers = {"Retry-After": str(retry_after)} if (retry_after := retry_after_of(exc)) is not None else {}
    allow = exc.data.get("allow") if exc.code == "METHOD_NOT_ALLOWED" else None
    if isinstance(allow, list):
        headers["Allow"] = ", ".join(str(method) for method in allow)
    return headers


def _message(exc: MeshError) -> str:
    return INTERNAL_MESSAGE if exc.code == "INTERNAL" else exc.message


def _wire_code(exc: MeshError) -> str:
    return exc.remote_code if isinstance(exc, RemoteError) else exc.code


def _monthly(exc: MeshError) -> bool:
    """Over a budget (a month's or a day's): "insufficient quota", not "slow down"."""
    return exc.code == "RATE_LIMITED" and exc.data.get("counter") in QUOTA_COUNTERS


def openai_kind(exc: MeshError) -> tuple[str, str | None]:
    """OpenAI's `(type, code)` for an error: the second table of the module doc."""
    code, reason = _wire_code(exc), exc.data.get("reason")
    default = http_error(exc).openai_type
    if code == "UNAUTHENTICATED":
        return default, None if reason == MISSING_CREDENTIAL else "invalid_api_key"
    if code == "NOT_FOUND" and reason == UNKNOWN_URL:
        return "invalid_request_error", "unknown_url"
    if code == "NOT_FOUND" and isinstance(exc.data.get("model"), str):
        return "invalid_request_error", "model_not_found"
    if code == "FORBIDDEN" and exc.data.get("param") == "model":
        return default, "model_not_allowed"
    if code == "RATE_LIMITED":
        if _monthly(exc):
            return "insufficient_quota", "insufficient_quota"
        counter = exc.data.get("counter")
        unit = "tokens" if isinstance(counter, str) and counter.startswith("tokens") else default
        return unit, "rate_limit_exceeded"
    if code == "INVALID_PARAMS" and reason == CONTEXT_LENGTH:
        return default, CONTEXT_LENGTH
    if code in ("INVALID_PARAMS", "DECODE_ERROR", "METHOD_NOT_ALLOWED"):
        return default, None
    return default, code.lower()


def openai_error_headers(exc: MeshError) -> dict[str, str]:
    """`error_headers`, plus what OpenAI's clients read: `x-should-retry: false` for an
    exhausted monthly quota, and the gateway's `x-request-id` when the error has one."""
    headers = error_headers(exc)
    if _monthly(exc):
        headers["x-should-retry"] = "false"
    request_id = exc.data.get("request_id")
    if isinstance(request_id, str) and request_id:
        headers["x-request-id"] = request_id
    return headers


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
    """OpenAI's error object, with OpenAI's `type` and `code` for the case (see `openai_kind`)."""
    param = exc.data.get("param")
    kind, code = openai_kind(exc)
    return {"error": {"message": _message(exc), "type": kind,
                      "param": param if isinstance(param, str) else None, "code": code}}


def openai_error(exc: MeshError, headers: dict[str, str] | None = None) -> web.Response:
    """A `/v1` error reply in OpenAI's shape, with the status from the table."""
    return web.Response(text=json.dumps(openai_error_body(exc)), status=status_of(exc),
                        content_type="application/json",
                        headers={**openai_error_headers(exc), **(headers or {})})
