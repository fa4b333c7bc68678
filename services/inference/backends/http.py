"""What the HTTP backends share: a session, and upstream failures as typed errors.

| upstream                                          | error                                       |
| ------------------------------------------------- | ------------------------------------------- |
| cannot connect, connection reset before an answer | UNAVAILABLE (retry_safe)                    |
| 404 (unknown model)                               | NOT_FOUND                                   |
| 400 / 422 (the request itself)                    | INVALID_PARAMS                              |
| 400, the prompt does not fit the context window   | INVALID_PARAMS, `param: "messages"`,        |
|                                                   | `reason: "context_length_exceeded"`         |
| 401 / 403 (the worker's API key)                  | UNAVAILABLE (retry_safe); with a key pool   |
|                                                   | the key is disabled and the next one tried  |
| 429 (the key's limit), 529 (overloaded)           | UNAVAILABLE, `retry_after` if sent; with a  |
|                                                   | key pool the key is exhausted until its     |
|                                                   | reset and the next one tried (`keys.py`)    |
| 5xx, any other status                             | UNAVAILABLE (retry_safe); counted on the    |
|                                                   | key's breaker, the next key tried           |
| a line that is not the protocol's JSON            | UNAVAILABLE                                 |
| stream dropped or ended early, read timeout       | UNAVAILABLE                                 |

Every UNAVAILABLE of a status carries it as `upstream_status`. Error bodies
are read in the protocols' shapes: Ollama's `{"error": "..."}`, OpenAI's
`{"error": {"message": ..., "type": ..., "code": ...}}` and Anthropic's
`{"type": "error", "error": {"type": ..., "message": ...}}`. The context
overflow is OpenAI's `code: "context_length_exceeded"` and Anthropic's
`invalid_request_error` saying "prompt is too long" (or "input length and
`max_tokens` exceed context limit").

A request may go with a `Credential` (a `keys.Lease`): its headers (the API
key) are sent with that request only, and it is told the status and headers
of the answer, success or error, before the error is raised -- how a key pool
learns about 429s, rate-limit headers and refused keys.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from services.inference.backends.base import Backend, Event
from services.inference.backends.keys import KeyPool, Lease
from shared.errors import InvalidParams, MeshError, NotFound, Unavailable

__all__ = ["DEFAULT_CONNECTIONS", "Credential", "HttpBackend", "HttpClient", "malformed", "dropped"]

T = TypeVar("T")

#: Connections to one server when the backend is not told its slots (aiohttp's own default).
DEFAULT_CONNECTIONS = 100
_MAX_ERROR_BODY = 4096
_MAX_LINE = 1 << 20


def _json_bytes(body: Mapping[str, Any]) -> bytes:
    """A request's JSON body: orjson's (aiohttp's own JSON payload was 4% of a worker's time);
    `json`'s for what orjson refuses (a lone surrogate: escaped, as `json` does)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body).encode()


def malformed(where: str, detail: str) -> Unavailable:
    """The server sent something that is not its protocol."""
    return Unavailable(f"{where} sent malformed data: {detail}", {"retry_safe": False})


def dropped(where: str, detail: str) -> Unavailable:
    """The stream stopped before its end."""
    return Unavailable(f"{where} dropped the stream: {detail}", {"retry_safe": False})


class Credential(Protocol):
    """What one request sends to authenticate, and who hears the answer's status and headers."""

    headers: Mapping[str, str]

    def observe(self, status: int, headers: Mapping[str, str]) -> None: ...


class HttpClient:
    """An aiohttp session to one server, raising typed errors."""

    def __init__(self, base_url: str, *, timeout: float, headers: Mapping[str, str] | None = None,
                 name: str = "server", connections: int = DEFAULT_CONNECTIONS) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = f"{name} at {self.base_url}"
        # `connect` bounds the wait for a connection of the pool as well as its opening: a
        # request never waits unseen for one (the pool is sized to the slots, so it should not).
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=min(timeout, 10.0),
                                              sock_read=timeout)
        self._headers = dict(headers or {})
        self.connections = max(1, connections)  #: the pool's size: at most this many requests at once
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections), timeout=self._timeout,
                headers=self._headers, read_bufsize=1 << 16,
            )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def get_json(self, path: str, credential: Credential | None = None) -> Any:
        async with self.request("GET", path, credential=credential) as response:
            return await self._json(response)

    async def post_json(self, path: str, body: Mapping[str, Any], credential: Credential | None = None) -> Any:
        async with self.request("POST", path, body, credential=credential) as response:
            return await self._json(response)

    @asynccontextmanager
    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None, *,
                      credential: Credential | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """An answered request with a 2xx status; any failure as a typed error.

        Leaving the block before the body was read closes the connection, which
        is how a cancelled generation is stopped upstream; a body read to its
        end leaves the connection open for reuse (no new TLS handshake).
        """
        if self._session is None:
            raise Unavailable(f"{self.name}: client closed", {"retry_safe": True})
        try:
            headers = {**credential.headers} if credential is not None else {}
            data = None
            if body is not None:
                data, headers["Content-Type"] = _json_bytes(body), "application/json"
            response = await self._session.request(method, self.base_url + path, data=data, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise Unavailable(f"cannot reach {self.name}: {_reason(exc)}", {"retry_safe": True}) from None
        try:
            if credential is not None:
                credential.observe(response.status, response.headers)
            if response.status >= 300:
                raise await self._status_error(response)
            yield response
        finally:
            if response.content.at_eof():
                response.release()  # read to the end: the connection is kept for the next request
            else:
                response.close()  # left early: closing stops the server's work

    async def lines(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The body's lines (stripped, blank ones skipped), drops as typed errors."""
        content = response.content
        while True:
            try:
                line = await content.readline(max_line_length=_MAX_LINE)
            except LineTooLong:
                raise malformed(self.name, f"a line over {_MAX_LINE} bytes") from None
            except (aiohttp.ClientError, HttpProcessingError, asyncio.TimeoutError, OSError) as exc:
                raise dropped(self.name, _reason(exc)) from None
            if not line:
                return
            line = line.strip()
            if line:
                yield line

    async def _json(self, response: aiohttp.ClientResponse) -> Any:
        try:
            return json.loads(await response.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise dropped(self.name, _reason(exc)) from None
        except ValueError as exc:
            raise malformed(self.name, f"not JSON ({exc})") from None

    async def _status_error(self, response: aiohttp.ClientResponse) -> MeshError:
        try:
            body = (await response.content.read(_MAX_ERROR_BODY)).decode(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            body = ""
        message, overflow = _error_message(body)
        text = f"{self.name} answered {response.status}: {message or response.reason}"
        status = response.status
        if status == 404:
            return NotFound(text)
        if status == 400 and overflow:
            return InvalidParams(text, {"param": "messages", "reason": "context_length_exceeded"})
        if status in (400, 422):
            return InvalidParams(text)
        data: dict[str, Any] = {"retry_safe": True, "upstream_status": status}
        retry_after = response.headers.get("Retry-After", "")
        if status in (429, 529) and retry_after.isdigit():  # 529: Anthropic's "overloaded"
            data["retry_after"] = int(retry_after)
        return Unavailable(text, data)


#: How Anthropic's 400 begins when the prompt (or it and max_tokens) does not fit the context.
_ANTHROPIC_OVERFLOW = ("prompt is too long", "input length and `max_tokens` exceed context limit")


def _error_message(body: str) -> tuple[str, bool]:
    """The message of an Ollama, OpenAI or Anthropic error body (else the body's start), and
    whether it says the prompt does not fit the model's context window."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.strip()[:200], False
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("code") or error)
        overflow = error.get("code") == "context_length_exceeded" or (
            error.get("type") == "invalid_request_error" and message.startswith(_ANTHROPIC_OVERFLOW))
        return message[:500], overflow
    if error is not None:
        return str(error)[:500], False
    return body.strip()[:200], False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out waiting for data"
    return str(exc) or type(exc).__name__


class HttpBackend(Backend):
    """A backend that talks to a model server through one `HttpClient`: the
    session opens with the backend and closes with it. A server that takes
    API keys is reached with a key of the backend's `keys` pool (`keyed`,
    `keyed_call`); without a pool, requests go without a key."""

    http: HttpClient
    keys: KeyPool | None = None

    def keyed(self, attempt: Callable[[Lease | None], AsyncGenerator[Event, None]]
              ) -> AsyncGenerator[Event, None]:
        """The events of `attempt` made with a key of the pool (rotated, see `keys.py`), or with none."""
        return attempt(None) if self.keys is None else self.keys.stream(attempt)

    async def keyed_call(self, attempt: Callable[[Lease | None], Awaitable[T]]) -> T:
        """`attempt` made with a key of the pool, or with none (as `keyed`)."""
        return await (attempt(None) if self.keys is None else self.keys.call(attempt))

    def keys_view(self) -> list[dict[str, Any]] | None:
        return None if self.keys is None else self.keys.view()

    async def start(self) -> None:
        await self.http.open()
        self.loaded = True

    async def close(self) -> None:
        await self.http.close()
        self.loaded = False
