"""Assembling the metrics service from its configuration and a mesh node.

Used by `__main__` (inside the runner's lifecycle) and by the tests, so both
run the same wiring: the aggregator, the health monitor (probing over the
mesh client), the active-user refresher (asking auth), the HTTP server.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

from shared.dht.interface import Discovery, Provider
from shared.rpc import MeshClient
from services.metrics.active_users import ActiveUsers
from services.metrics.aggregate import Aggregator
from services.metrics.config import MetricsConfig
from services.metrics.exposition import Exposition, MeshCollector
from services.metrics.health import HealthMonitor
from services.metrics.http import MetricsHttp
from services.metrics.service import MetricsService

__all__ = ["MeshProber", "MetricsApp", "open_metrics"]


class MeshProber:
    """`rpc.ping` and `inference.models` over the node's kept-open mesh connections."""

    def __init__(self, mesh: MeshClient) -> None:
        self._mesh = mesh

    async def ping(self, provider: Provider, timeout: float) -> None:
        await self._mesh.connection(provider).call("rpc.ping", timeout=timeout)

    async def models(self, provider: Provider, timeout: float) -> list[str]:
        answer = await self._mesh.connection(provider).call("inference.models", timeout=timeout)
        listed = answer.get("models") if isinstance(answer, dict) else None
        return [m["name"] for m in listed or () if isinstance(m, dict) and isinstance(m.get("name"), str)
                and 0 < len(m["name"]) <= 128]

    def forget(self, provider: Provider) -> None:
        self._mesh.cool_down(provider)  # drops (closes) its idle connection


@dataclass(frozen=True, slots=True)
class MetricsApp:
    """The parts of a running metrics service (the tests look inside)."""

    service: MetricsService
    aggregator: Aggregator
    health: HealthMonitor
    active_users: ActiveUsers
    exposition: Exposition
    http: MetricsHttp


async def open_metrics(
    stack: AsyncExitStack, config: MetricsConfig, discovery: Discovery, mesh: MeshClient,
) -> MetricsApp:
    """Every part started on `stack` (closed in reverse); the service to serve."""
    aggregator = Aggregator(series_cap=config.series_cap, gauge_ttl=config.gauge_ttl)
    health = HealthMonitor(
        discovery, MeshProber(mesh), required=config.required, interval=config.probe_interval,
        ping_timeout=config.ping_timeout, forget_after=config.forget_after,
    )
    await stack.enter_async_context(health)

    async def fetch_active_users() -> object:
        return await mesh("auth").call("auth.active_users", timeout=5.0, idempotent=True)

    active_users = ActiveUsers(fetch_active_users, interval=config.active_users_interval)
    await stack.enter_async_context(active_users)
    exposition = Exposition(MeshCollector(aggregator, health, active_users))
    http = MetricsHttp(exposition.render, health.report, host=config.http_host, port=config.http_port)
    await stack.enter_async_context(http)
    service = MetricsService(aggregator, health)
    return MetricsApp(service, aggregator, health, active_users, exposition, http)
