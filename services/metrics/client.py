"""`MetricsClient`: the metrics service's RPC methods as typed calls.

    metrics = MetricsClient(mesh("metrics"))          # or MetricsClient.of(mesh)
    report = await metrics.health(timeout=5.0)

`record` is what a `MetricsReporter` (shared/metrics/reporter.py) sends; a
process reports through one of those, not by calling `record` itself.
`health` is for members (gateway, web): the report names every endpoint.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

from shared.rpc.typed import TypedClient, Wire

__all__ = ["HealthReport", "InstanceHealth", "MetricsClient", "ModelCapacity", "Recorded", "ServiceHealth"]

Status = Literal["ok", "degraded", "down", "absent"]


class Recorded(TypedDict):
    result: Literal["ok", "duplicate", "unknown", "retired"]
    seq: int


class ServiceHealth(TypedDict):
    status: Status
    required: bool
    instances: int
    ok: int


class InstanceHealth(TypedDict):
    service: str
    instance: str
    endpoint: str
    version: Any
    status: Literal["ok", "unreachable", "withdrawn", "gone"]
    announced: bool
    reachable: bool
    latency_ms: float | None
    error: str | None
    last_announced: float  #: wall clock
    last_reachable: float | None
    models: list[str]
    #: inference workers: per model, {"breaker": Breaker.view() | None, "keys": [key views] | None}
    served: dict[str, dict[str, Any]]


class ModelCapacity(TypedDict):
    workers: int
    slots: int
    slots_free: int
    queue_depth: int


class HealthReport(TypedDict):
    """The mesh's health (services/metrics/health.py, `HealthMonitor.report`)."""

    status: Literal["ok", "degraded", "down"]  #: the rollup
    checked_at: float | None
    interval_s: float
    services: dict[str, ServiceHealth]
    instances: list[InstanceHealth]
    models: dict[str, ModelCapacity]


class MetricsClient(TypedClient):
    """Typed calls to the metrics service."""

    SERVICE = "metrics"
    METHODS = {
        "record": Wire("metrics.record", idempotent=True),
        "health": Wire("metrics.health", idempotent=True),
    }

    async def record(self, *, batch: dict[str, Any], timeout: float | None = None) -> Recorded:
        """One reporter batch (wire format: shared/metrics/batch.py), applied once by its source and seq."""
        return await self._call("record", timeout, batch=batch)

    async def health(self, *, timeout: float | None = None) -> HealthReport:
        return await self._call("health", timeout)
