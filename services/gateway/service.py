"""The gateway service: the public entry for inference.

    gateway.infer   public  api_key | token, model, messages | prompt, max_tokens, temperature,
                            top_p, stop, seed, stream -> the worker's chunks; the last one also
                            carries request_id and rate_limit (limit/remaining/reset per counter)
    gateway.models  public  -> {models: [{name, workers, healthy_workers}]}
    gateway.quota   public  api_key | token -> {user_id, tier, rate_limit: {counter: {limit,
                            used, remaining, reset}}}
    gateway.health  public  -> {status, gateway, live_gateways, in_flight, usage_unshipped, ...}
    gateway.status  public  token (an administrator's) -> the mesh's health report (metrics.health)

`gateway.infer`, in order: authenticate (cached, revocation within 1 s),
check the parameters, find the model's workers (`NOT_FOUND` for a model
nobody serves), hold quota (`RATE_LIMITED` with `retry_after`), then stream
from a worker chosen on live load. A worker that fails before the first
token is replaced (bounded attempts, within the caller's deadline); after
the first token the caller gets a typed error. Every request an
authenticated caller makes gets exactly one usage record, journaled before
the last chunk is sent. Relaying lives in `relay.py`.

Every call made while serving a request -- key validation, token checks,
worker and catalog lookups, quota waits, the worker's stream -- gets the
request's deadline (the caller's, from `current_request`), capped where a cap
is documented, never a fixed budget shorter than what the caller granted.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from shared.errors import Forbidden, MeshError, Unavailable
from shared.rpc import ServiceClient, current_request, method
from services.gateway.accounts import Accounts, Job
from services.gateway.budget import budget
from services.gateway.callers import Callers
from services.gateway.checks import Limits, check_request
from services.gateway.journal import Journal
from services.gateway.metrics import Metrics
from services.gateway.quota import Quota
from services.gateway.relay import Relay
from services.gateway.report import Report
from services.gateway.router import Router

__all__ = ["GatewayService"]

_DEFAULT_BUDGET = 300.0


class GatewayService:
    """Authenticate, limit, route, account (see the module doc)."""

    name = "gateway"

    def __init__(
        self, callers: Callers, quota: Quota, router: Router, relay: Relay, accounts: Accounts,
        journal: Journal, metrics: Metrics, *, limits: Limits = Limits(), gateway_id: str = "",
        report: Report | None = None, metrics_service: ServiceClient | None = None,
    ) -> None:
        self._report = report or Report()
        self._metrics_service = metrics_service
        self._callers = callers
        self._quota = quota
        self._router = router
        self._relay = relay
        self._accounts = accounts
        self._journal = journal
        self._limits = limits
        self.gateway_id = gateway_id
        self._metrics = metrics
        self._requests = metrics.counter("gateway_requests_total", ("status",))
        self._refusals = metrics.counter("gateway_rate_limited_total", ("counter",))
        self._in_flight = metrics.gauge("gateway_in_flight")
        self.in_flight = 0

    @method(public=True)
    async def infer(
        self, model: str, api_key: str | None = None, token: str | None = None,
        messages: list[Any] | None = None, prompt: str | None = None, max_tokens: int = 256,
        temperature: float = 0.7, top_p: float = 0.95, stop: str | list[Any] | None = None,
        seed: int | None = None, stream: bool = True,
    ) -> AsyncIterator[dict[str, Any]]:
        """Generate with `model`; chunks as `inference.generate`, the last one with rate-limit facts."""
        deadline = _deadline()
        try:
            caller = await self._callers.identify(api_key, token, deadline=deadline)
        except MeshError as exc:
            self._requests.inc(status=exc.code.lower())
            raise
        job = Job("gw-" + secrets.token_hex(12), caller.user_id, caller.key_id, model)
        try:
            checked = check_request(self._limits, model=model, messages=messages, prompt=prompt,
                                    max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    stop=stop, seed=seed, stream=stream)
            job.prompt_hash = checked.prompt_hash
            workers = await self._router.workers(model, deadline=deadline)
            admission = await self._quota.admit(caller.user_id, caller.limits, checked.reserve, deadline=deadline)
        except MeshError as exc:
            self._accounts.finished(job, exc.code.lower())
            self._requests.inc(status=exc.code.lower())
            if exc.code == "RATE_LIMITED":
                self._refusals.inc(counter=exc.data.get("counter", "other"))
                self._report.rate_limited(caller.tier)
            raise
        self._accounts.admitted(job, admission)
        checked.params["priority"] = caller.priority
        checked.params["tenant"] = f"user:{caller.user_id}"  # the worker's response cache is per user
        self.in_flight += 1
        self._in_flight.set(self.in_flight)
        try:
            async with aclosing(self._relay.run(job, caller, checked.params, workers, deadline)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.in_flight -= 1
            self._in_flight.set(self.in_flight)

    @method(public=True, idempotent=True)
    async def models(self) -> dict[str, Any]:
        """Every model some worker serves, with how many workers serve it and how many are healthy."""
        catalog = await self._router.catalog(deadline=_deadline())
        return {"models": [{"name": name, **counts} for name, counts in sorted(catalog.items())]}

    @method(public=True, idempotent=True)
    async def quota(self, api_key: str | None = None, token: str | None = None) -> dict[str, Any]:
        """The caller's limits: per counter limit, used, remaining and reset (epoch seconds)."""
        caller = await self._callers.identify(api_key, token, deadline=_deadline())
        facts = await self._quota.snapshot(caller.user_id, caller.limits)
        for fact in facts.values():
            fact["used"] = None if fact["limit"] is None else fact["limit"] - fact["remaining"]
        return {"user_id": caller.user_id, "tier": caller.tier, "priority": caller.priority, "rate_limit": facts}

    @method(public=True, idempotent=True)
    async def status(self, token: str) -> dict[str, Any]:
        """The mesh's health report (`metrics.health`), for administrators: it names every endpoint."""
        deadline = _deadline()
        caller = await self._callers.identify(None, token, deadline=deadline)
        if not caller.is_admin:
            raise Forbidden("the status of the mesh is for administrators")
        if self._metrics_service is None:
            raise Unavailable("this gateway has no metrics service to ask")
        return await self._metrics_service.call("metrics.health", timeout=budget(deadline, 10.0, "ask metrics"),
                                                idempotent=True)

    @method(public=True, idempotent=True)
    async def health(self) -> dict[str, Any]:
        """Whether this gateway serves, and the few figures that say how well."""
        return {
            "status": "ok", "gateway": self.gateway_id, "live_gateways": self._quota.live,
            "in_flight": self.in_flight, "usage_unshipped": self._journal.unshipped,
            "usage_shipped": self._journal.shipped_count,
            "requests": {labels[0]: count for labels, count in self._requests.series.items()},
            "worker_retries": self._metrics.counter("gateway_worker_retries_total").value(),
        }


def _deadline() -> float:
    """The deadline of the request being served (time.monotonic()); a long default outside one."""
    context = current_request.get()
    return context.deadline if context is not None else time.monotonic() + _DEFAULT_BUDGET
