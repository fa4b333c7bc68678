"""The gateway service: the public entry for inference.

    gateway.infer   public  api_key | token, model, stream, and the generation parameters
                            (shared/generation/: messages | prompt, max_tokens, temperature,
                            top_p, stop, seed, tools, tool_choice, response_format, ...) -> the
                            worker's chunks; the first and the last carry request_id, the last
                            also rate_limit (limit/remaining/reset per counter) and receipt
                            (signed, shared/receipts.py)
    gateway.embed   public  api_key | token, model, input (list of texts), dimensions? -> {model,
                            vectors (float32 LE bytes each), dimensions, usage, request_id,
                            rate_limit, receipt}: routed, limited and billed like a generation
    gateway.models  public  -> {models: [{name, workers, healthy_workers, capabilities}]}
    gateway.quota   public  api_key | token -> {user_id, tier, currency, rate_limit: {counter:
                            {limit, used, remaining, reset, scope}}} (money as decimal strings)
    gateway.health  public  -> {status, gateway, live_gateways, in_flight, usage_unshipped, ...}
    gateway.status  public  token (an administrator's) -> the mesh's health report (metrics.health)

`gateway.infer` is one `Request` (request.py): identify, check, route, admit,
relay, settle, record, count -- read there top to bottom. Every call made
while serving a request (key validation, token checks, worker and catalog
lookups, quota waits, the worker's stream) gets the request's deadline (the
caller's, from `current_request`), capped where a cap is documented, never a
fixed budget shorter than what the caller granted.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

from shared.errors import Forbidden, Unavailable
from shared.rpc import current_request, method
from services.metrics.client import MetricsClient
from services.gateway.budget import budget
from services.gateway.journal import Journal
from services.gateway.request import Parts, Request

__all__ = ["GatewayService"]

_DEFAULT_BUDGET = 300.0


class GatewayService:
    """The gateway's methods; a `gateway.infer` call is a `Request`."""

    name = "gateway"

    def __init__(self, parts: Parts, journal: Journal, *, gateway_id: str = "",
                 metrics_service: MetricsClient | None = None) -> None:
        self._parts = parts
        self._callers, self._quota, self._router = parts.callers, parts.quota, parts.router
        self._counts = parts.counts
        self._journal = journal
        self._metrics_service = metrics_service
        self.gateway_id = gateway_id

    @property
    def in_flight(self) -> int:
        return self._counts.in_flight

    @method(public=True)
    async def infer(
        self, model: str, api_key: str | None = None, token: str | None = None, stream: bool = True,
        fallback: bool = True, **generation: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Generate with `model` (a model, an alias or `default`); the parameters of the
        generation contract (shared/generation/); chunks as `inference.generate`, the
        first with `request_id` and the `model` routed to, the last with `request_id`,
        rate-limit facts and `tried` when other models failed first. `fallback=False`:
        the chain's first model only (fallback.py)."""
        request = Request(self._parts, model, _deadline(), fallback=fallback)
        self._counts.in_flight += 1
        try:
            chunk: dict[str, Any] | None = await request.start(api_key, token, generation, stream)
            while chunk is not None:
                yield chunk
                chunk = await request.next()
        finally:
            self._counts.in_flight -= 1
            await request.end()

    @method(public=True)
    async def embed(
        self, model: str, input: list[Any], api_key: str | None = None, token: str | None = None,
        dimensions: int | None = None,
    ) -> dict[str, Any]:
        """One vector per text of `input` (little-endian float32 bytes each), routed, limited
        and billed like a generation (its prompt tokens); with `request_id` and rate-limit facts."""
        request = Request(self._parts, model, _deadline())
        self._counts.in_flight += 1
        try:
            return await request.embed(api_key, token, input, dimensions)
        finally:
            self._counts.in_flight -= 1
            await request.end()

    @method(public=True, idempotent=True)
    async def models(self) -> dict[str, Any]:
        """Every model some worker serves, with how many workers serve it and how many are healthy."""
        catalog = await self._router.catalog(deadline=_deadline())
        return {"models": [{"name": name, **counts} for name, counts in sorted(catalog.items())]}

    @method(public=True, idempotent=True)
    async def quota(self, api_key: str | None = None, token: str | None = None) -> dict[str, Any]:
        """The caller's limits: per counter limit, used, remaining and reset (epoch seconds)."""
        caller = await self._callers.identify(api_key, token, deadline=_deadline())
        facts = await self._quota.snapshot(caller.scopes)
        for fact in facts.values():
            limit, remaining = fact["limit"], fact["remaining"]
            if limit is None:
                fact["used"] = None
            elif isinstance(limit, str):  # money: decimal strings, exact
                fact["used"] = str(Decimal(limit) - Decimal(remaining))
            else:
                fact["used"] = limit - remaining
        return {"user_id": caller.user_id, "tier": caller.tier, "priority": caller.priority, "rate_limit": facts,
                "currency": caller.currency}

    @method(public=True, idempotent=True)
    async def status(self, token: str) -> dict[str, Any]:
        """The mesh's health report (`metrics.health`), for administrators: it names every endpoint."""
        deadline = _deadline()
        caller = await self._callers.identify(None, token, deadline=deadline)
        if not caller.is_admin:
            raise Forbidden("the status of the mesh is for administrators")
        if self._metrics_service is None:
            raise Unavailable("this gateway has no metrics service to ask")
        return dict(await self._metrics_service.health(timeout=budget(deadline, 10.0, "ask metrics")))

    @method(public=True, idempotent=True)
    async def health(self) -> dict[str, Any]:
        """Whether this gateway serves, and the few figures that say how well."""
        return {
            "status": "ok", "gateway": self.gateway_id, "live_gateways": self._quota.live,
            "in_flight": self._counts.in_flight, "usage_unshipped": self._journal.unshipped,
            "usage_shipped": self._journal.shipped_count, "requests": dict(self._counts.outcomes),
            "worker_retries": self._parts.relay.retries, "streams_cut": self._parts.relay.cut,
            "fallbacks": self._counts.fallbacks,
            "sessions_cached": self._callers.sessions_cached,
            "dispatch": {"in_flight": self._parts.dispatch.in_flight, "waiting": self._parts.dispatch.waiting,
                         "capacity": self._parts.dispatch.capacity, "waited": self._parts.dispatch.waited,
                         "refused": self._parts.dispatch.refused},
        }


def _deadline() -> float:
    """The deadline of the request being served (time.monotonic()); a long default outside one."""
    context = current_request.get()
    return context.deadline if context is not None else time.monotonic() + _DEFAULT_BUDGET
