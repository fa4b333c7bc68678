"""Assembling the metrics service from its configuration and a mesh node.

Used by `__main__` (inside the runner's lifecycle) and by the tests, so both
run the same wiring: the aggregator, the health monitor (probing over the
mesh client), the active-user refresher (asking auth), the HTTP server, and
the process's own reporter (its DHT peers, its RPC requests), which pushes to
every metrics service like any reporter, to its own directly.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

from typing import Any

from shared.dht.interface import Provider
from shared.metrics import MeshDirectory, Metrics, MetricsReporter, instance_id
from shared.metrics.reporter import RECORD
from shared.rpc import MeshClient
from shared.runner import MeshNode
from services.auth.client import AuthClient
from services.metrics.active_users import ActiveUsers
from services.metrics.aggregate import Aggregator
from services.metrics.config import MetricsConfig
from services.metrics.exposition import Exposition, MeshCollector
from services.metrics.health import HealthMonitor
from services.metrics.served import ModelState, parse_models
from services.metrics.http import MetricsHttp
from services.metrics.service import MetricsService

__all__ = ["LocalSender", "MeshProber", "MetricsApp", "open_metrics"]


class MeshProber:
    """`rpc.ping` and `inference.models` (each model's name, breaker and keys) over the
    node's kept-open mesh connections."""

    def __init__(self, mesh: MeshClient) -> None:
        self._mesh = mesh

    async def ping(self, provider: Provider, timeout: float) -> None:
        await self._mesh.connection(provider).call("rpc.ping", timeout=timeout)

    async def models(self, provider: Provider, timeout: float) -> list[ModelState]:
        answer = await self._mesh.connection(provider).call("inference.models", timeout=timeout)
        return parse_models(answer)

    def forget(self, provider: Provider) -> None:
        self._mesh.cool_down(provider)  # drops (closes) its idle connection


class LocalSender:
    """The metrics process's own service as a reporter's `Sender`: called directly."""

    def __init__(self, service: MetricsService) -> None:
        self._service = service

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   timeout: float = 10.0) -> Any:
        assert method == RECORD, method
        return await self._service.record(**(params or {}))


@dataclass(frozen=True, slots=True)
class MetricsApp:
    """The parts of a running metrics service (the tests look inside)."""

    service: MetricsService
    aggregator: Aggregator
    health: HealthMonitor
    active_users: ActiveUsers
    exposition: Exposition
    http: MetricsHttp
    metrics: Metrics  #: this process's own registry


async def open_metrics(stack: AsyncExitStack, config: MetricsConfig, node: MeshNode) -> MetricsApp:
    """Every part started on `stack` (closed in reverse); the service to serve."""
    discovery, mesh = node.discovery, node.mesh
    aggregator = Aggregator(series_cap=config.series_cap, gauge_ttl=config.gauge_ttl,
                            retention=config.retention, max_sources=config.max_sources)
    health = HealthMonitor(
        discovery, MeshProber(mesh), required=config.required, interval=config.probe_interval,
        ping_timeout=config.ping_timeout, forget_after=config.forget_after,
    )
    await stack.enter_async_context(health)

    auth = AuthClient(mesh("auth"))

    async def fetch_active_users() -> object:
        return await auth.active_users(timeout=5.0)

    active_users = ActiveUsers(fetch_active_users, interval=config.active_users_interval)
    await stack.enter_async_context(active_users)
    exposition = Exposition(MeshCollector(aggregator, health, active_users))
    http = MetricsHttp(exposition.render, health.report, host=config.http_host, port=config.http_port)
    await stack.enter_async_context(http)
    service = MetricsService(aggregator, health)
    metrics = node.metrics  # the runner counts this process's RPC requests into it
    own = node.identity.public_key
    directory = MeshDirectory(mesh, local=LocalSender(service), own_key=own)
    await stack.enter_async_context(MetricsReporter(
        metrics, directory, service="metrics", instance=instance_id(own), peers=discovery))
    return MetricsApp(service, aggregator, health, active_users, exposition, http, metrics)
