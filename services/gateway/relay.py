"""Relaying one admitted request to a worker, and settling it however it ends.

    async for chunk in relay.run(job, caller, params, workers, deadline): ...

* **Before the first token** a failing worker (unreachable, dropped, backend
  down, queue full, not serving the model after all) is replaced by another,
  at most `attempts` in all and within the caller's deadline; the failed one
  is cooled down (a full queue is only skipped). If none works, the caller
  gets the last typed error and the quota is released: no worker took it.
* **A worker took it** once its stream opened, or when the caller's deadline
  passed (or the caller left) while a worker had it: from then on the request
  consumes its request counts whatever the outcome -- a caller choosing
  deadlines shorter than the prefill gets no free work. A worker's own
  `TIMEOUT` for its queue (`INFERSWARM_QUEUE_TIMEOUT`, before the caller's
  deadline) is not the caller's doing: nothing started, nothing is kept.
* **After the first token** a failure is the caller's: `UNAVAILABLE` saying
  the answer is incomplete (`data.delivered_tokens`, `retry_safe: false`), or
  `TIMEOUT`, and the request is billed for the text delivered and its prompt
  (`prompt_tokens` of the first text chunk, as the worker counted it).
* **The caller's deadline** is passed upstream, less a small margin so that
  the worker's `TIMEOUT` comes back in time to be answered and accounted.
* **The caller cancels or disconnects**: the upstream stream is closed, which
  sends CANCEL, so the worker stops; the request is billed for what was
  delivered (text chunks sent: one per token for the local model) and its prompt.

The usage record is journaled before the last chunk is yielded.

**What a worker said stays inside.** A worker's error reaches the caller with
its code, but its message -- which may name a backend URL, an endpoint of the
mesh or an upstream server's own error text -- is logged here (with the trace
id) and replaced by a plain one; of its data only the keys a caller can act on
pass (`_for_caller`). Errors about the request itself (`INVALID_PARAMS`,
`TOO_LARGE`) keep their message: it speaks of what the caller sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from shared.dht import Provider
from shared.errors import MeshError, NotFound, Timeout, Unavailable
from shared.logging import get_logger
from shared.rpc import MeshClient, Stream
from services.gateway.accounts import Accounts, Job
from services.gateway.callers import Caller
from services.gateway.metrics import Metrics
from services.gateway.quota import Quota
from services.gateway.report import Report
from services.gateway.router import Router

__all__ = ["Relay"]

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


def _for_caller(error: MeshError, job: Job) -> MeshError:
    """The worker's `error` as the caller may see it (see the module doc)."""
    if error.code in _ABOUT_THE_REQUEST:
        message = error.message
    else:
        log.info("worker error kept from the caller", code=error.code, error=error.message,
                 request_id=job.request_id)
        message = _PLAIN.get(error.code, "the worker failed")
    data = {key: error.data[key] for key in _CALLER_DATA if key in error.data}
    data["request_id"] = job.request_id
    return type(error)(message, data)


class Relay:
    """Streams admitted requests from workers (see the module doc)."""

    def __init__(
        self, mesh: MeshClient, router: Router, quota: Quota, accounts: Accounts, metrics: Metrics, *,
        attempts: int = 3, margin: float = 0.05, report: Report | None = None,
    ) -> None:
        self._report = report or Report()
        self._mesh = mesh
        self._router = router
        self._quota = quota
        self._accounts = accounts
        self.attempts = attempts
        self._margin = margin
        self._requests = metrics.counter("gateway_requests_total", ("status",))
        self._seconds = metrics.histogram("gateway_request_seconds", ("status",))
        self._ttft = metrics.histogram("gateway_time_to_first_chunk_seconds")
        self._tokens = metrics.counter("gateway_tokens_total", ("kind",))
        self._retries = metrics.counter("gateway_worker_retries_total")
        self._cut = metrics.counter("gateway_streams_cut_total", ("reason",))

    async def run(
        self, job: Job, caller: Caller, params: dict[str, Any], workers: list[Provider], deadline: float,
    ) -> AsyncIterator[dict[str, Any]]:
        upstream: Stream | None = None
        provider: Provider | None = None
        delivered = 0
        status: str | None = "cancelled"  # unless the request ends otherwise
        try:
            upstream, provider, chunk = await self._open(job, params, workers, deadline)
            while True:
                if chunk.get("done"):
                    final = self._succeeded(job, caller, chunk, provider)
                    status = None
                    yield final
                    return
                if isinstance(chunk.get("text"), str):
                    delivered += 1
                    if delivered == 1:
                        job.prompt_tokens = _count(chunk.get("prompt_tokens"))
                yield chunk
                chunk = await self._next(upstream, delivered, job)
        except MeshError as exc:
            status = exc.code.lower() if delivered == 0 else "worker_failed" if exc.code != "TIMEOUT" else "timeout"
            raise
        except Exception:
            status = "internal"
            raise
        finally:
            if upstream is not None:
                await upstream.aclose()  # CANCEL to the worker if it is still going
            if provider is not None:
                self._router.finished(provider)
            if status is not None:
                if status == "cancelled" and time.monotonic() >= deadline:
                    status = "timeout"
                self._failed(job, status, delivered, provider)

    async def _open(
        self, job: Job, params: dict[str, Any], workers: list[Provider], deadline: float,
    ) -> tuple[Stream, Provider, dict[str, Any]]:
        """A worker's stream and its first chunk, trying others while nothing was delivered."""
        tried: set[bytes] = set()
        last: MeshError | None = None
        for _ in range(self.attempts):
            budget = deadline - time.monotonic()
            budget -= min(self._margin, budget / 10)
            if budget <= 0:
                raise Timeout("the deadline passed before a worker answered", {"request_id": job.request_id})
            try:
                provider = self._router.choose(job.model, workers, tried)
            except Unavailable:
                if last is not None:
                    raise _for_caller(last, job) from None
                raise
            self._router.started(provider)
            sent = time.monotonic()
            upstream: Stream | None = None
            try:
                upstream = await self._mesh.connection(provider).stream("inference.generate", params,
                                                                        timeout=budget)
                first = await anext(upstream)
                job.reached = True
            except StopAsyncIteration:
                error: MeshError = Unavailable("the worker ended the stream without an answer",
                                               {"retry_safe": False})
            except _RETRYABLE as exc:
                error = exc
            except BaseException as exc:
                # The deadline passed or the caller left while the worker had it: it took the work
                # (not a worker's own queue limit, reached before the caller's deadline).
                own_limit = isinstance(exc, Timeout) and "queued" in exc.data \
                    and time.monotonic() - sent < budget - self._margin
                if isinstance(exc, (Timeout, asyncio.CancelledError, GeneratorExit)) and not own_limit:
                    job.reached, job.worker = True, provider.node_hex
                if upstream is not None:
                    await upstream.aclose()
                self._router.finished(provider)
                if isinstance(exc, MeshError):
                    raise _for_caller(exc, job) from exc
                raise
            else:
                self._router.first_token(provider, time.monotonic() - sent)
                self._ttft.observe(time.monotonic() - sent)
                self._report.first_token(job.model, time.monotonic() - sent)
                return upstream, provider, first
            if upstream is not None:
                await upstream.aclose()
            busy = "queued" in error.data and "limit" in error.data  # a full queue: skip, not cool down
            self._router.finished(provider, failed=True, busy=busy)
            log.info("worker failed before the first token; trying another", worker=provider.node_hex[:16],
                     code=error.code, error=error.message)
            tried.add(provider.node_key)
            last = error
            self._retries.inc()
        assert last is not None
        raise _for_caller(last, job) from last

    async def _next(self, upstream: Stream, delivered: int, job: Job) -> dict[str, Any]:
        """The next chunk after some text was delivered; a failure is now the caller's."""
        try:
            return await anext(upstream)
        except StopAsyncIteration:
            error: MeshError = Unavailable("the worker ended the stream before its final chunk")
        except Timeout as exc:
            self._cut.inc(reason="timeout")
            raise Timeout(f"the deadline passed after {delivered} chunks; the answer is incomplete",
                          {"request_id": job.request_id, "delivered_tokens": delivered}) from exc
        except MeshError as exc:
            error = exc
        self._cut.inc(reason="worker")
        log.info("worker failed mid-stream", code=error.code, error=error.message, request_id=job.request_id)
        raise Unavailable(
            f"the worker failed after {delivered} chunks; the answer is incomplete",
            {"request_id": job.request_id, "delivered_tokens": delivered, "retry_safe": False,
             "cause": error.code},
        ) from error

    def _succeeded(self, job: Job, caller: Caller, chunk: dict[str, Any], provider: Provider) -> dict[str, Any]:
        usage = chunk.get("usage") if isinstance(chunk.get("usage"), dict) else {}
        prompt_tokens = _count(usage.get("prompt_tokens"))
        completion_tokens = _count(usage.get("completion_tokens"))
        if job.admission is not None:
            self._quota.settle(job.admission, prompt_tokens + completion_tokens)
        worker = chunk.get("worker")
        worker_id = worker.get("id") if isinstance(worker, dict) and isinstance(worker.get("id"), str) else None
        self._accounts.finished(job, "ok", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                cached=chunk.get("cached") is True, worker=worker_id or provider.node_hex)
        self._requests.inc(status="ok")
        self._seconds.observe(time.monotonic() - job.started, status="ok")
        self._tokens.inc(prompt_tokens, kind="prompt")
        self._tokens.inc(completion_tokens, kind="completion")
        self._report.finished(job.model, time.monotonic() - job.started, prompt_tokens, completion_tokens,
                              cached=chunk.get("cached") is True)
        return {**chunk, "request_id": job.request_id,
                "rate_limit": self._quota.facts(caller.user_id, caller.limits)}

    def _failed(self, job: Job, status: str, delivered: int, provider: Provider | None) -> None:
        prompt_tokens = job.prompt_tokens if delivered else 0
        if job.admission is not None:
            if job.reached or delivered:
                self._quota.settle(job.admission, prompt_tokens + delivered)  # a worker took it
            else:
                self._quota.release(job.admission)  # no worker took it: nothing kept
        self._accounts.finished(job, status, prompt_tokens=prompt_tokens, completion_tokens=delivered,
                                worker=provider.node_hex if provider is not None else job.worker)
        self._requests.inc(status=status)
        self._seconds.observe(time.monotonic() - job.started, status=status)
        self._tokens.inc(prompt_tokens, kind="prompt")
        self._tokens.inc(delivered, kind="completion")
        self._report.finished(job.model, time.monotonic() - job.started, prompt_tokens, delivered)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
