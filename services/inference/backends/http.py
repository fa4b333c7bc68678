"""What the HTTP backends share: a session, and upstream failures as typed errors.

| upstream                                         | error                              |
| ------------------------------------------------ | ---------------------------------- |
| cannot connect, connection reset before an answer | UNAVAILABLE (retry_safe)           |
| 404 (unknown model)                              | NOT_FOUND                          |
| 400 / 422 (the request itself)                   | INVALID_PARAMS                     |
| 401 / 403 (the worker's API key)                 | UNAVAILABLE (retry_safe)           |
| 429 (the server's own limit), 529 (overloaded)    | UNAVAILABLE, `retry_after` if sent |
| 5xx, any other status                            | UNAVAILABLE (retry_safe)           |
| a line that is not the protocol's JSON           | UNAVAILABLE                        |
| stream dropped or ended early, read timeout      | UNAVAILABLE                        |

Error bodies are read in the protocols' shapes: Ollama's `{"error": "..."}`,
OpenAI's `{"error": {"message": ..., "type": ..., "code": ...}}` and
Anthropic's `{"type": "error", "error": {"type": ..., "message": ...}}`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from services.inference.backends.base import Backend
from shared.errors import InvalidParams, MeshError, NotFound, Unavailable

__all__ = ["HttpBackend", "HttpClient", "malformed", "dropped"]

_MAX_ERROR_BODY = 4096
_MAX_LINE = 1 << 20


def malformed(where: str, detail: str) -> Unavailable:
    """The server sent something that is not its protocol."""
    return Unavailable(f"{where} sent malformed data: {detail}", {"retry_safe": False})


def dropped(where: str, detail: str) -> Unavailable:
    """The stream stopped before its end."""
    return Unavailable(f"{where} dropped the stream: {detail}", {"retry_safe": False})


class HttpClient:
    """An aiohttp session to one server, raising typed errors."""

    def __init__(self, base_url: str, *, timeout: float, headers: Mapping[str, str] | None = None,
                 name: str = "server") -> None:
        self.base_url = base_url.rstrip("/")
        self.name = f"{name} at {self.base_url}"
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 10.0), sock_read=timeout)
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers=self._headers, read_bufsize=1 << 16
            )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def get_json(self, path: str) -> Any:
        async with self.request("GET", path) as response:
            return await self._json(response)

    async def post_json(self, path: str, body: Mapping[str, Any]) -> Any:
        async with self.request("POST", path, body) as response:
            return await self._json(response)

    @asynccontextmanager
    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None
                      ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An answered request with a 2xx status; any failure as a typed error.

        Leaving the block before the body was read closes the connection, which
        is how a cancelled generation is stopped upstream; a body read to its
        end leaves the connection open for reuse (no new TLS handshake).
        """
        if self._session is None:
            raise Unavailable(f"{self.name}: client closed", {"retry_safe": True})
        try:
            response = await self._session.request(method, self.base_url + path, json=body)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise Unavailable(f"cannot reach {self.name}: {_reason(exc)}", {"retry_safe": True}) from None
        try:
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
        text = f"{self.name} answered {response.status}: {_error_message(body) or response.reason}"
        status = response.status
        if status == 404:
            return NotFound(text)
        if status in (400, 422):
            return InvalidParams(text)
        data: dict[str, Any] = {"retry_safe": True, "upstream_status": status}
        retry_after = response.headers.get("Retry-After", "")
        if status in (429, 529) and retry_after.isdigit():  # 529: Anthropic's "overloaded"
            data["retry_after"] = int(retry_after)
        return Unavailable(text, data)


def _error_message(body: str) -> str:
    """The message of an Ollama or OpenAI error body, else the body's start."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.strip()[:200]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or error)[:500]
    if error is not None:
        return str(error)[:500]
    return body.strip()[:200]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out waiting for data"
    return str(exc) or type(exc).__name__


class HttpBackend(Backend):
    """A backend that talks to a model server through one `HttpClient`: the
    session opens with the backend and closes with it."""

    http: HttpClient

    async def start(self) -> None:
        await self.http.open()
        self.loaded = True

    async def close(self) -> None:
        await self.http.close()
        self.loaded = False
