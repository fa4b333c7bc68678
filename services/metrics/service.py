"""The metrics service: `metrics.record` and `metrics.health`.

    metrics.record   any member, idempotent   batch -> {"result": "ok" | "duplicate" | "unknown" | "retired", "seq"}
    metrics.health   gateway, web, idempotent   -> the health report (see health.py)

The wire format of a batch is in shared/metrics/batch.py; the aggregation
rules (per-source cumulative values, retired sources, gauge staleness,
in-order by seq, series caps) in aggregate.py. No transport here: HTTP is http.py, the mesh is the runner's.
"""

from __future__ import annotations

from typing import Any

from shared.errors import InvalidParams
from shared.logging import get_logger
from shared.metrics.batch import MAX_ENTRIES, parse_batch
from shared.rpc import method
from services.metrics.aggregate import Aggregator
from services.metrics.health import HealthMonitor

__all__ = ["MetricsService"]

log = get_logger(__name__)


class MetricsService:
    """Receives every node's metrics; reports the health of the mesh."""

    name = "metrics"

    def __init__(self, aggregator: Aggregator, health: HealthMonitor, *,
                 max_entries: int = MAX_ENTRIES) -> None:
        self._aggregator = aggregator
        self._health = health
        self._max_entries = max_entries

    @method(idempotent=True)
    async def record(self, batch: dict) -> dict[str, Any]:  # type: ignore[type-arg]
        """Apply one reporter push once and in order (by its source id and seq).

        `unknown`: a partial push from a source this service does not hold (send
        a full one); `retired`: the source was retired here, nothing more of it counts."""
        try:
            source, seq, parsed = parse_batch(batch, max_entries=self._max_entries)
        except InvalidParams:
            self._aggregator.invalid()
            raise
        return {"result": self._aggregator.apply(source, seq, parsed), "seq": seq}

    @method(idempotent=True, roles=("gateway", "web"))
    async def health(self) -> dict[str, Any]:
        """Announced and reachable, per instance; per service; the system rollup.

        Members only: the report names every instance's endpoint. Users see it
        through `gateway.status` or web's `/status`, both for admins only."""
        return self._health.report()
