"""The CLI over HTTP: the web service's API behind the interface the mesh path uses.

For people who cannot reach the mesh, `--base-url URL` (or
`INFERSWARM_BASE_URL`) sends client commands to a web service (services/web)
instead. `HttpSession` stands where `ClientSession` does: `session("gateway")`
is a service client whose `call(method, params)` and `stream(method, params)`
take the mesh's wire names and parameters, so `GatewayClient`, `AuthClient`
and the commands run unchanged. Each method is one route:

    gateway.infer     POST   /v1/chat/completions (SSE when streamed)  the API key as Bearer
    gateway.models    GET    /v1/models                                the API key as Bearer
    gateway.quota     GET    /api/quota                                X-API-Key, else the session token
    auth.usage        GET    /api/usage?start=&end=                    the session token as Bearer
    auth.report       GET    /api/reports?start=&end=&group=&by=       the session token as Bearer
    auth.top_spenders GET    /api/admin/top-spenders?start=&end=&limit= an admin's session token as Bearer
    auth.me           GET    /api/budget                               the session token as Bearer
    auth.set_budget   PUT    /api/budget                               the session token as Bearer
    auth.register, login, logout, logout_all, change_password,
    list_keys, create_key, update_key, revoke_key, rotate_key  /api/auth/...       (services/web/api.py)
    auth.create_org, orgs, org, invite, invitations, answer_invite,
    set_member_role, remove_member, set_org_limits, org_report  /api/orgs/..., /api/invites/...
                                                                               (services/web/org_api.py)

Answers come back in the RPC shapes: `/v1` chunks become `{"text"}` chunks and
a final `{"done": true, model, finish_reason, usage, id, receipt}` (no `timing`,
`cached` or `rate_limit`: /v1 does not carry them). Errors become the same typed
errors (`shared.errors`), so the CLI prints the same line and exit code: the
code from the body (OpenAI's `code` is ours in lower case, REST's is ours),
else from the status (`STATUS_CODES`); a 429's `Retry-After` and
`x-ratelimit-*` headers become `retry_after`, `counter` and `rate_limit`. A
server that cannot be reached is UNAVAILABLE naming the URL; no answer within
the timeout is TIMEOUT.

Standard library only (asyncio streams, `ssl` for https): the CLI starts in a
quarter of a second and imports no server-side library. One connection per
call (`Connection: close`); closing a stream closes its connection, which
makes the web service cancel the generation.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

from shared.errors import (ERROR_CLASSES, DecodeError, InvalidParams, MeshError, MethodNotFound, Timeout, Unauthenticated,
                           Unavailable, from_wire)

__all__ = ["HttpSession", "HttpService", "EventStream", "ROUTES", "STATUS_CODES", "error_of"]

#: Our error code for an HTTP status whose body does not name one.
STATUS_CODES = {400: "INVALID_PARAMS", 401: "UNAUTHENTICATED", 403: "FORBIDDEN", 404: "NOT_FOUND",
                409: "CONFLICT", 413: "TOO_LARGE", 429: "RATE_LIMITED", 500: "INTERNAL",
                501: "METHOD_NOT_FOUND", 503: "UNAVAILABLE", 504: "TIMEOUT"}
_COUNTERS = ("requests_per_hour", "requests_per_month", "tokens_per_month", "spend_per_day", "spend_per_month")
_RECEIPT_HEADER = "x-inferswarm-receipt"  #: shared/receipts.py's HEADER (this module keeps to the standard library)
_NO_KEY = "no API key: run `inferswarm keys create NAME` or set INFERSWARM_API_KEY"


class Route(NamedTuple):
    """One REST route: how an RPC method's parameters travel, and its answer."""

    verb: str
    path: str  #: may name a parameter: /api/auth/api-keys/{key_id}
    auth: str  #: "none", "token" (Bearer) or "either" (X-API-Key, else Bearer token)
    body: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    unwrap: str | None = None  #: the field of the reply that is the RPC answer
    rename: tuple[tuple[str, str], ...] = ()  #: (RPC parameter, its name in the query), where they differ
    nulls: bool = False  #: a body parameter given as None is sent as null (PATCH: null clears, absent keeps)
    body_of: str | None = None  #: the parameter whose value is the whole body (a map of limits)


ROUTES = {
    "auth.register": Route("POST", "/api/auth/register", "none", ("username", "email", "password")),
    "auth.login": Route("POST", "/api/auth/login", "none", ("username_or_email", "password")),
    "auth.logout": Route("POST", "/api/auth/logout", "token"),
    "auth.logout_all": Route("POST", "/api/auth/logout-all", "token"),
    "auth.change_password": Route("POST", "/api/auth/password", "token", ("old_password", "new_password")),
    "auth.list_keys": Route("GET", "/api/auth/api-keys", "token", unwrap="keys"),
    "auth.create_key": Route("POST", "/api/auth/api-keys", "token",
                             ("name", "expires_in_days", "expires_at", "allowed_models", "limits", "org")),
    "auth.update_key": Route("PATCH", "/api/auth/api-keys/{key_id}", "token",
                             ("name", "expires_at", "allowed_models", "limits"), nulls=True),
    "auth.revoke_key": Route("DELETE", "/api/auth/api-keys/{key_id}", "token"),
    "auth.rotate_key": Route("POST", "/api/auth/api-keys/{key_id}/rotate", "token", ("overlap_seconds",)),
    # GET /api/budget answers what `auth.me` does (the account, its budget, limits, currency).
    "auth.me": Route("GET", "/api/budget", "token"),
    "auth.set_budget": Route("PUT", "/api/budget", "token", ("spend_per_day", "spend_per_month", "user"), nulls=True),
    "auth.usage": Route("GET", "/api/usage", "token", query=("start", "end")),
    "auth.report": Route("GET", "/api/reports", "token", query=("start", "end", "group_by", "by"),
                         rename=(("group_by", "group"),)),
    "auth.top_spenders": Route("GET", "/api/admin/top-spenders", "token", query=("start", "end", "limit")),
    "gateway.quota": Route("GET", "/api/quota", "either"),
    "auth.create_org": Route("POST", "/api/orgs", "token", ("name",)),
    "auth.orgs": Route("GET", "/api/orgs", "token", unwrap="orgs"),
    "auth.org": Route("GET", "/api/orgs/{org}", "token"),
    "auth.invite": Route("POST", "/api/orgs/{org}/invites", "token", ("username", "role")),
    "auth.invitations": Route("GET", "/api/invites", "token", unwrap="invites"),
    "auth.answer_invite": Route("POST", "/api/invites/{invite_id}", "token", ("accept",)),
    "auth.set_member_role": Route("PATCH", "/api/orgs/{org}/members/{user}", "token", ("role",)),
    "auth.remove_member": Route("DELETE", "/api/orgs/{org}/members/{user}", "token"),
    "auth.set_org_limits": Route("PUT", "/api/orgs/{org}/limits", "token", body_of="limits"),
    "auth.org_report": Route("GET", "/api/orgs/{org}/report", "token", query=("start", "end", "group_by", "by"),
                             rename=(("group_by", "group"),)),
    "auth.set_webhook": Route("PUT", "/api/webhook", "token", ("url", "thresholds")),
    "auth.webhook": Route("GET", "/api/webhook", "token"),
    "auth.remove_webhook": Route("DELETE", "/api/webhook", "token"),
    "auth.rotate_webhook_secret": Route("POST", "/api/webhook/rotate", "token"),
    "auth.webhook_deliveries": Route("GET", "/api/webhook/deliveries", "token", query=("limit", "before_id")),
    "auth.alerts": Route("GET", "/api/alerts", "token", query=("limit",)),
}


class Reply:
    """The status and headers of one HTTP/1.1 response; its body read on demand."""

    def __init__(self, url: str, status: int, headers: dict[str, str],
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.url, self.status, self.headers = url, status, headers
        self._reader, self._writer = reader, writer

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives: chunked, by Content-Length, or to the end of the connection."""
        reader = self._reader
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)  # ValueError: not HTTP
                if size == 0:
                    return  # trailers, if any, are not read: the connection closes
                yield (await reader.readexactly(size + 2))[:-2]
        length = self.headers.get("content-length")
        if length is not None:
            if int(length):
                yield await reader.readexactly(int(length))
            return
        while piece := await reader.read(65536):
            yield piece

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.pieces()])

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines (without their end), for server-sent events."""
        buffer = b""
        async for piece in self.pieces():
            buffer += piece
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                yield line.rstrip(b"\r").decode()
        if buffer:
            yield buffer.rstrip(b"\r").decode()

    async def answer(self) -> Any:
        """The JSON body of a success, or the typed error of an error reply."""
        raw = await self.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if self.status >= 300:
            raise error_of(self.status, self.headers, body, self.url)
        if body is None:
            raise DecodeError(f"{self.url} answered {self.status} with a body that is not JSON")
        return body

    def close(self) -> None:
        self._writer.close()


class HttpSession:
    """The web service at `base_url`, in place of a `ClientSession` (see the module doc).

    `api_key` is for the routes that need one but take none as a parameter
    (`gateway.models`); `ca_file` adds a certificate authority for https.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 ca_file: Path | None = None) -> None:
        parts = urlsplit(base_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidParams(f"the base URL must be http://HOST[:PORT] or https://HOST[:PORT], not {base_url!r}",
                                {"param": "base_url"})
        self.base_url = base_url.strip().rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._netloc = parts.netloc.rpartition("@")[2]
        # "https://host/v1" as OpenAI's SDKs take it, or the site's root: the routes name /v1 themselves.
        self._prefix = re.sub(r"/v1$", "", parts.path.rstrip("/"))
        self._origin = f"{parts.scheme}://{self._netloc}"
        self._tls = parts.scheme == "https"
        self._ca_file = ca_file
        self.api_key = api_key
        self.timeout = timeout

    async def __aenter__(self) -> HttpSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def __call__(self, service: str) -> HttpService:
        return HttpService(self, service)

    async def request(self, verb: str, path: str, *, body: Any = None, headers: dict[str, str] | None = None,
                      deadline: float) -> Reply:
        """Send one request; the reply with its status and headers read (its body is not)."""
        url = self._origin + self._prefix + path
        payload = b"" if body is None else json.dumps(body).encode()
        head = {"Host": self._netloc, "User-Agent": "inferswarm-cli", "Accept": "*/*", "Connection": "close",
                **({"Content-Type": "application/json"} if body is not None else {}),
                "Content-Length": str(len(payload)), **(headers or {})}
        reader, writer = await within(deadline, self._connect(), url)
        try:
            writer.write(f"{verb} {self._prefix}{path} HTTP/1.1\r\n".encode()
                         + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + payload)
            status, fields = await within(deadline, _read_head(reader), url)
        except BaseException:
            writer.close()
            raise
        return Reply(url, status, fields, reader, writer)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = None
        if self._tls:
            try:
                context = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
            except OSError as exc:  # a missing file, or not PEM (ssl.SSLError)
                raise InvalidParams(f"--ca-file {self._ca_file}: {_reason(exc)}", {"param": "ca_file"}) from None
        try:
            return await asyncio.open_connection(self._host, self._port, ssl=context, limit=1 << 20)
        except OSError as exc:
            raise Unavailable(f"cannot reach {self.base_url}: {_reason(exc)}", {"url": self.base_url}) from None


async def within(deadline: float, step: Any, url: str) -> Any:
    """Await `step` until `deadline` (monotonic); a cut connection is UNAVAILABLE, no answer TIMEOUT."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await step
    except TimeoutError:
        raise Timeout(f"no answer from {url} in time") from None
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise Unavailable(f"the connection to {url} was cut ({_reason(exc)})") from None
    except (ValueError, UnicodeDecodeError, asyncio.LimitOverrunError):
        raise DecodeError(f"{url} did not answer in HTTP/1.1") from None


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = (await reader.readline()).decode("latin-1")
    if not status_line:
        raise asyncio.IncompleteReadError(b"", None)
    version, status, *_ = status_line.split(" ", 2)
    if not version.startswith("HTTP/1."):
        raise ValueError(status_line)
    fields: dict[str, str] = {}
    while (line := (await reader.readline()).decode("latin-1").strip()):
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status), fields


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's, not the system's
        return f"TLS: {str(exc.reason or exc).lower()}"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "it closed before the reply was complete"
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno).lower()
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class HttpService:
    """One service's methods over HTTP, as `ServiceClient` offers them over the mesh.

    `affinity` is taken and ignored: behind the URL, the web service picks the
    caller's gateway by the same rule."""

    def __init__(self, session: HttpSession, service: str) -> None:
        self._session = session
        self.topic = service

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   timeout: float | None = None, idempotent: bool = False, affinity: bytes | None = None) -> Any:
        params = dict(params or {})
        deadline = time.monotonic() + (self._session.timeout if timeout is None else timeout)
        if method == "gateway.models":
            return await self._models(deadline)
        route = ROUTES.get(method)
        if route is None:
            raise MethodNotFound(f"{method} is not offered over HTTP: this command needs the mesh")
        path = route.path.format(**{k: quote(str(params.pop(k, "")), safe="")
                                    for k in re.findall(r"\{(\w+)\}", route.path)})
        names = dict(route.rename)
        query = {names.get(k, k): params[k] for k in route.query if params.get(k) is not None}
        body = {k: params[k] for k in route.body if k in params and (route.nulls or params[k] is not None)}
        if route.body_of is not None:
            body = params.get(route.body_of) or {}
        answer = await self._exchange(route.verb, path + ("?" + urlencode(query) if query else ""),
                                      body if route.verb in ("POST", "PATCH", "PUT") else None,
                                      _auth(route.auth, params), deadline)
        return answer[route.unwrap] if route.unwrap else answer

    async def stream(self, method: str, params: dict[str, Any] | None = None, *,
                     timeout: float | None = None, affinity: bytes | None = None) -> EventStream:
        if method != "gateway.infer":
            raise MethodNotFound(f"{method} is not offered over HTTP: this command needs the mesh")
        params = dict(params or {})
        deadline = time.monotonic() + (self._session.timeout if timeout is None else timeout)
        key = params.pop("api_key", None)
        if not key:
            raise Unauthenticated(_NO_KEY)
        params.pop("token", None)
        streamed = params.setdefault("stream", True)
        if streamed:
            params["stream_options"] = {"include_usage": True}
        reply = await self._session.request("POST", "/v1/chat/completions", body=params,
                                            headers={"Authorization": f"Bearer {key}"}, deadline=deadline)
        if reply.status >= 300:
            try:
                await within(deadline, reply.answer(), reply.url)  # raises the reply's error
            finally:
                reply.close()
        return EventStream(reply, deadline, streamed)

    async def _models(self, deadline: float) -> dict[str, Any]:
        """`/v1/models` as `gateway.models` answers (its `workers` are the healthy ones)."""
        if not self._session.api_key:
            raise Unauthenticated(_NO_KEY)
        listed = await self._exchange("GET", "/v1/models", None,
                                      {"Authorization": f"Bearer {self._session.api_key}"}, deadline)
        return {"models": [{"name": m["id"], "workers": m.get("workers", "-"),
                            "healthy_workers": m.get("workers", "-")} for m in listed.get("data", [])]}

    async def _exchange(self, verb: str, path: str, body: Any, headers: dict[str, str], deadline: float) -> Any:
        reply = await self._session.request(verb, path, body=body, headers=headers, deadline=deadline)
        try:
            return await within(deadline, reply.answer(), reply.url)
        finally:
            reply.close()


def _auth(kind: str, params: dict[str, Any]) -> dict[str, str]:
    if kind == "either" and params.get("api_key"):
        return {"X-API-Key": params["api_key"]}
    if kind in ("token", "either"):
        if not params.get("token"):
            raise Unauthenticated("not logged in: run `inferswarm login`")
        return {"Authorization": f"Bearer {params['token']}"}
    return {}


class EventStream:
    """The chunks of one `/v1/chat/completions` reply, as `gateway.infer` streams them.

    Like the mesh's `Stream`: iterate it, and close it (`async with`); closing
    it early closes the connection, and the web service stops the generation.
    """

    def __init__(self, reply: Reply, deadline: float, streamed: bool) -> None:
        self._reply = reply
        self._deadline = deadline
        self._chunks = self._events() if streamed else self._whole()
        self._final: dict[str, Any] = {"done": True}

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await within(self._deadline, anext(self._chunks), self._reply.url)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self._reply.close()
        try:
            await self._chunks.aclose()
        except RuntimeError:  # still running: it ends as the closed connection reaches it
            pass

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        data: list[str] = []
        async for line in self._reply.lines():
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:
                text, data = "\n".join(data), []
                if text.strip() == "[DONE]":
                    yield self._final
                    return
                for chunk in self._absorb(_event(text, self._reply)):
                    yield chunk
        if "finish_reason" not in self._final:
            raise Unavailable(f"the stream from {self._reply.url} ended early")
        yield self._final

    async def _whole(self) -> AsyncIterator[dict[str, Any]]:
        completion = await self._reply.answer()
        if not isinstance(completion, dict):
            raise DecodeError(f"{self._reply.url} answered with a JSON body that is not an object")
        choices = [{**c, "delta": c.get("message") or {}} for c in completion.get("choices") or []
                   if isinstance(c, dict)]
        for chunk in self._absorb({**completion, "choices": choices}):
            yield chunk
        if self._reply.headers.get(_RECEIPT_HEADER):
            self._final["receipt"] = self._reply.headers[_RECEIPT_HEADER]
        yield self._final

    def _absorb(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The text of one chunk; its model, id, finish reason, usage and receipt kept for the final chunk."""
        for name in ("model", "id", "usage", "receipt"):
            if event.get(name) is not None:
                self._final[name] = event[name]
        texts = []
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                texts.append({"text": content})
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                self._final["finish_reason"] = choice["finish_reason"]
        return texts


def _event(text: str, reply: Reply) -> dict[str, Any]:
    try:
        event = json.loads(text)
    except ValueError:
        raise DecodeError(f"{reply.url} sent an event that is not JSON") from None
    if not isinstance(event, dict):
        raise DecodeError(f"{reply.url} sent an event that is not a JSON object")
    if "error" in event:  # the stream had begun: the error comes in-band
        raise error_of(None, {}, event, reply.url)
    return event


def error_of(status: int | None, headers: dict[str, str], body: Any, url: str = "the server") -> MeshError:
    """The typed error of an HTTP error reply (or an in-band stream error, with no status)."""
    if status is not None and 300 <= status < 400:  # not followed: the user is told where to point
        where = headers.get("location", "elsewhere")
        return InvalidParams(f"{url} redirects to {where}: give that as --base-url", {"status": status})
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    code = error.get("code").upper() if isinstance(error.get("code"), str) else None
    if code not in ERROR_CLASSES:  # another server's code ("model_not_found"): the status says more
        code = STATUS_CODES.get(status or 500) or ("UNAVAILABLE" if (status or 500) >= 500 else "INVALID_PARAMS")
    message = error.get("message") if isinstance(error.get("message"), str) else f"{url} answered HTTP {status}"
    data: dict[str, Any] = {"status": status} if status else {}
    if isinstance(error.get("param"), str):
        data["param"] = error["param"]
    if code == "RATE_LIMITED":
        data.update(_rate_limit_data(message, headers, error))
    return from_wire(code, message, data)


def _rate_limit_data(message: str, headers: dict[str, str], error: dict[str, Any]) -> dict[str, Any]:
    """`retry_after`, and the refused counter's facts as far as the `x-ratelimit-*` headers tell them."""
    data: dict[str, Any] = {}
    retry = headers.get("retry-after") or error.get("retry_after")
    if str(retry).isdigit():
        data["retry_after"] = int(retry)  # type: ignore[arg-type]
    counter = next((name for name in _COUNTERS if name in message), None)
    if counter is not None and counter.startswith("spend_"):  # a money budget: decimal strings
        data["counter"] = counter
        limit, remaining = headers.get("x-inferswarm-budget-limit"), headers.get("x-inferswarm-budget-remaining")
        if limit and remaining:
            data["rate_limit"] = {counter: {"limit": limit, "remaining": remaining}}
        return data
    kind = "tokens" if counter == "tokens_per_month" else "requests"
    limit, remaining = headers.get(f"x-ratelimit-limit-{kind}"), headers.get(f"x-ratelimit-remaining-{kind}")
    if counter and limit and remaining and limit.isdigit() and remaining.isdigit():
        data["counter"] = counter
        data["rate_limit"] = {counter: {"limit": int(limit), "remaining": int(remaining)}}
    return data
