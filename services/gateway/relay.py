"""Streaming one admitted request from a worker: open, pass chunks, close.

    upstream = await relay.open(request_id, model, params, workers, deadline, took=on_taken)
    chunk = upstream.first
    chunk = await upstream.next(delivered)       # until a chunk with "done"
    await upstream.close()                       # always (idempotent)

    answer = await relay.call(request_id, "inference.embed", model, params, workers, deadline,
                              took=on_taken)     # a unary call, with the same retries

Relay only streams; what a request costs and how it is recorded is the
request's (request.py). What it tells the request: `took(worker)` when a
worker took the work -- its stream opened, or the caller's deadline passed (or
the caller left) while a worker had it.

* **Before the first chunk** a failing worker (unreachable, dropped, backend
  down, a full queue, not serving the model after all) is replaced by another,
  at most `attempts` in all and within the caller's deadline; the failed one
  is cooled down (a full queue, `reason: "queue_full"`, is only skipped). If
  none works, the caller gets the last typed error. A worker's own `TIMEOUT`
  for its queue (`reason: "queue_timeout"`, before the caller's deadline) is
  not the caller's doing: nothing started, no worker took it.
* **After the first chunk** a failure is the caller's: `UNAVAILABLE` saying
  the answer is incomplete (`data.delivered_tokens`, `retry_safe: false`), or
  `TIMEOUT`.
* **The caller's deadline** is passed upstream, less a small margin so that
  the worker's `TIMEOUT` comes back in time to be answered and accounted.
* **Closing** the upstream sends CANCEL if the worker is still going, so it
  stops generating.

**What a worker said stays inside.** A worker's error reaches the caller with
its code, but its message -- which may name a backend URL, an endpoint of the
mesh or an upstream server's own error text -- is logged here (with the
request id) and replaced by a plain one; of its data only the keys a caller
can act on pass (`for_caller`). Errors about the request itself
(`INVALID_PARAMS`, `TOO_LARGE`) keep their message: it speaks of what the
caller sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from shared.dht import Provider
from shared.errors import MeshError, NotFound, Timeout, Unavailable
from shared.logging import get_logger
from shared.rpc import MeshClient, Stream
from services.gateway.router import Router

__all__ = ["Relay", "Upstream", "for_caller"]

log = get_logger(__name__)

_RETRYABLE = (Unavailable, NotFound)
#: What a caller reads when a worker failed, by code; other codes keep their message.
_PLAIN = {
    "UNAVAILABLE": "no worker could answer: the model server is unavailable",
    "NOT_FOUND": "the model is not available on its workers",
    "TIMEOUT": "the deadline passed before a worker answered",
}
_ABOUT_THE_REQUEST = ("INVALID_PARAMS", "TOO_LARGE")
#: Data keys a caller may see: what it can act on, nothing about the mesh.
_CALLER_DATA = ("retry_after", "retry_safe", "param", "request_id", "delivered_tokens", "cause")
#: Why a worker refused before starting (`data.reason`, services/inference/README.md).
QUEUE_FULL, QUEUE_TIMEOUT = "queue_full", "queue_timeout"


def for_caller(error: MeshError, request_id: str) -> MeshError:
    """The worker's `error` as the caller may see it (see the module doc)."""
    if error.code in _ABOUT_THE_REQUEST:
        message = error.message
    else:
        log.info("worker error kept from the caller", code=error.code, error=error.message, request_id=request_id)
        message = _PLAIN.get(error.code, "the worker failed")
    data = {key: error.data[key] for key in _CALLER_DATA if key in error.data}
    if error.code in _ABOUT_THE_REQUEST and isinstance(error.data.get("reason"), str):
        data["reason"] = error.data["reason"]  # e.g. context_length_exceeded, unsupported
    data["request_id"] = request_id
    return type(error)(message, data)


class Upstream:
    """One worker's open stream for one request; `first` is its first chunk."""

    def __init__(self, relay: Relay, request_id: str, stream: Stream, provider: Provider,
                 first: dict[str, Any], ttft: float) -> None:
        self._relay = relay
        self._request_id = request_id
        self._stream: Stream | None = stream
        self.provider = provider
        self.first = first
        self.ttft = ttft  #: seconds from sending the request to its first chunk

    async def next(self, delivered: int) -> dict[str, Any]:
        """The chunk after `delivered` text chunks; a failure now cuts the answer."""
        assert self._stream is not None, "next() after close()"
        try:
            return await anext(self._stream)
        except StopAsyncIteration:
            error: MeshError = Unavailable("the worker ended the stream before its final chunk")
        except Timeout as exc:
            self._relay.cut += 1
            raise Timeout(f"the deadline passed after {delivered} chunks; the answer is incomplete",
                          {"request_id": self._request_id, "delivered_tokens": delivered}) from exc
        except MeshError as exc:
            error = exc
        self._relay.cut += 1
        log.info("worker failed mid-stream", code=error.code, error=error.message, request_id=self._request_id)
        raise Unavailable(
            f"the worker failed after {delivered} chunks; the answer is incomplete",
            {"request_id": self._request_id, "delivered_tokens": delivered, "retry_safe": False,
             "cause": error.code},
        ) from error

    async def close(self) -> None:
        """Stop the worker if it is still going (CANCEL); tell the router it is done."""
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                await stream.aclose()
            finally:
                self._relay.router.finished(self.provider)


class Relay:
    """Opens worker streams for admitted requests (see the module doc)."""

    def __init__(self, mesh: MeshClient, router: Router, *, attempts: int = 3, margin: float = 0.05) -> None:
        self._mesh = mesh
        self.router = router
        self.attempts = attempts
        self._margin = margin
        self.retries = 0  #: workers replaced before a first chunk
        self.cut = 0  #: streams cut after some text

    async def open(
        self, request_id: str, model: str, params: dict[str, Any], workers: list[Provider], deadline: float, *,
        took: Callable[[str], None],
    ) -> Upstream:
        """A worker's stream and its first chunk, trying others while nothing was delivered."""
        attempts = _Attempts(self, request_id, model, workers, deadline)
        params = {**params, "request_id": request_id}  # for the worker's log lines
        for _ in range(self.attempts):
            provider, budget = attempts.next()
            sent = time.monotonic()
            stream: Stream | None = None
            try:
                stream = await self._mesh.connection(provider).stream("inference.generate", params, timeout=budget)
                first = await anext(stream)
            except StopAsyncIteration:
                error: MeshError = Unavailable("the worker ended the stream without an answer",
                                               {"retry_safe": False})
            except _RETRYABLE as exc:
                error = exc
            except BaseException as exc:
                # The deadline passed or the caller left while the worker had it: it took the work
                # (not a worker's own queue limit, reached before the caller's deadline).
                own_limit = isinstance(exc, Timeout) and exc.data.get("reason") == QUEUE_TIMEOUT \
                    and time.monotonic() - sent < budget - self._margin
                if isinstance(exc, (Timeout, asyncio.CancelledError, GeneratorExit)) and not own_limit:
                    took(provider.node_hex)
                await _close(stream)
                self.router.finished(provider)
                if isinstance(exc, MeshError):
                    raise for_caller(exc, request_id) from exc
                raise
            else:
                took(provider.node_hex)
                ttft = time.monotonic() - sent
                self.router.first_token(provider, ttft)
                return Upstream(self, request_id, stream, provider, first, ttft)
            await _close(stream)
            attempts.failed(provider, error)
        raise attempts.exhausted()

    async def call(
        self, request_id: str, method: str, model: str, params: dict[str, Any], workers: list[Provider],
        deadline: float, *, took: Callable[[str], None],
    ) -> dict[str, Any]:
        """A worker's whole answer to a unary `method` (`inference.embed`), with the
        rules of `open` before a first chunk: other workers are tried on a failure,
        within `attempts` and the deadline."""
        attempts = _Attempts(self, request_id, model, workers, deadline)
        params = {**params, "request_id": request_id}
        for _ in range(self.attempts):
            provider, budget = attempts.next()
            sent = time.monotonic()
            try:
                answer = await self._mesh.connection(provider).call(method, params, timeout=budget)
            except _RETRYABLE as exc:
                attempts.failed(provider, exc)
                continue
            except BaseException as exc:
                if isinstance(exc, (Timeout, asyncio.CancelledError)):
                    took(provider.node_hex)
                self.router.finished(provider)
                if isinstance(exc, MeshError):
                    raise for_caller(exc, request_id) from exc
                raise
            took(provider.node_hex)
            self.router.first_token(provider, time.monotonic() - sent)
            self.router.finished(provider)
            if not isinstance(answer, dict):
                raise Unavailable("the worker's answer is not a map", {"request_id": request_id})
            return answer
        raise attempts.exhausted()


class _Attempts:
    """The workers tried for one request, in turn: each within the caller's deadline
    (less the margin), none twice; the last failure is what the caller gets."""

    def __init__(self, relay: Relay, request_id: str, model: str, workers: list[Provider], deadline: float) -> None:
        self._relay, self._request_id, self._model, self._workers = relay, request_id, model, workers
        self._deadline = deadline
        self._tried: set[bytes] = set()
        self._last: MeshError | None = None

    def next(self) -> tuple[Provider, float]:
        """The next worker (started on the router) and the seconds it may take."""
        budget = self._deadline - time.monotonic()
        budget -= min(self._relay._margin, budget / 10)
        if budget <= 0:
            raise Timeout("the deadline passed before a worker answered", {"request_id": self._request_id})
        try:
            provider = self._relay.router.choose(self._model, self._workers, self._tried)
        except Unavailable:
            if self._last is not None:
                raise for_caller(self._last, self._request_id) from self._last
            raise
        self._relay.router.started(provider)
        return provider, budget

    def failed(self, provider: Provider, error: MeshError) -> None:
        """`provider` failed before answering: cool it down (a full queue is only skipped; a
        worker that answered that the model failed, for that model only)."""
        busy = error.data.get("reason") == QUEUE_FULL
        self._relay.router.finished(provider, failed=True, busy=busy, answered=error.remote)
        log.info("worker failed before answering; trying another", worker=provider.node_hex[:16],
                 code=error.code, error=error.message)
        self._tried.add(provider.node_key)
        self._last = error
        self._relay.retries += 1

    def exhausted(self) -> MeshError:
        """What the caller gets once every attempt failed (the worker's own error as its cause)."""
        assert self._last is not None
        error = for_caller(self._last, self._request_id)
        error.__cause__ = self._last
        return error


async def _close(stream: Stream | None) -> None:
    if stream is not None:
        await stream.aclose()
