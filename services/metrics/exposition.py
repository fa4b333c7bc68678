"""`/metrics`: the aggregated state in Prometheus text format, via prometheus-client.

A custom collector reads the state at scrape time (nothing is recorded in
prometheus-client's global registry): the pushed families from the
`Aggregator`, health, worker capacity, circuit breakers and upstream keys
from the `HealthMonitor`, active users from `ActiveUsers`, and the service's
own figures (batches, series per family, series-cap overflow, live sources). Every family is declared in
shared/metrics/families.py, and every series count is bounded there or here.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from shared.metrics import families as fm
from shared.metrics.families import FAMILIES, Family, Kind
from services.metrics.active_users import ActiveUsers
from services.metrics.aggregate import Aggregator
from services.metrics.health import HealthMonitor

__all__ = ["MeshCollector", "Exposition"]

_PUSHED = [f for f in FAMILIES.values() if f.pushed]
_ROLLUPS = ("ok", "degraded", "down")


def _new(fam: Family) -> Metric:
    labels = list(fam.label_names)
    if fam.kind is Kind.COUNTER:
        return CounterMetricFamily(fam.name, fam.help, labels=labels)
    if fam.kind is Kind.HISTOGRAM:
        return HistogramMetricFamily(fam.name, fam.help, labels=labels)
    return GaugeMetricFamily(fam.name, fam.help, labels=labels)


class MeshCollector:
    """A prometheus-client collector over the metrics service's state."""

    def __init__(self, aggregator: Aggregator, health: HealthMonitor, active: ActiveUsers) -> None:
        self._aggregator = aggregator
        self._health = health
        self._active = active

    def describe(self) -> list[Metric]:
        return []  # names are fixed in families.py; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        self._aggregator.expire()
        for fam in _PUSHED:
            yield self._pushed(fam)
        yield from self._health_families()
        active = _new(fm.ACTIVE_USERS)
        for window, count in sorted(self._active.counts.items()):
            active.add_metric([window], count)
        yield active
        yield from self._self_families()

    def _pushed(self, fam: Family) -> Metric:
        metric = _new(fam)
        agg = self._aggregator
        if fam.kind is Kind.COUNTER:
            for series, value in sorted(agg.counters(fam.name).items()):
                metric.add_metric(list(series), value)
        elif fam.kind is Kind.HISTOGRAM:
            bounds = [*map(floatToGoString, fam.buckets), "+Inf"]
            for series, cells in sorted(agg.histograms(fam.name).items()):
                cumulative, running = [], 0.0
                for bound, count in zip(bounds, cells[:-1]):
                    running += count
                    cumulative.append((bound, running))
                metric.add_metric(list(series), cumulative, sum_value=cells[-1])
        else:
            for series, value in sorted(agg.gauges(fam.name).items()):
                metric.add_metric(list(series), value)
        return metric

    def _health_families(self) -> Iterator[Metric]:
        up, announced, ping = _new(fm.SERVICE_UP), _new(fm.SERVICE_ANNOUNCED), _new(fm.SERVICE_PING)
        for known in sorted(self._health.instances.values(), key=lambda k: (k.service, k.instance)):
            labels = list(fm.SERVICE_UP.fold([known.service, known.instance]))
            up.add_metric(labels, 1.0 if known.reachable else 0.0)
            announced.add_metric(labels, 1.0 if known.announced else 0.0)
            if known.latency_ms is not None:
                ping.add_metric(labels, known.latency_ms / 1000)
        yield from (up, announced, ping)
        status = _new(fm.SYSTEM_STATUS)
        current = self._health.report()["status"] if self._health.checked_at is not None else None
        if current is not None:
            for rollup in _ROLLUPS:
                status.add_metric([rollup], 1.0 if rollup == current else 0.0)
        yield status
        capacity = self._health.capacity()
        gauges = {"workers": _new(fm.WORKERS), "slots": _new(fm.WORKER_SLOTS),
                  "slots_free": _new(fm.WORKER_SLOTS_FREE), "queue_depth": _new(fm.WORKER_QUEUE_DEPTH)}
        folded: dict[str, dict[str, int]] = {}
        for model, figures in capacity.items():
            into = folded.setdefault(fm.MODEL.fold(model), dict.fromkeys(gauges, 0))
            for name, value in figures.items():
                into[name] += value
        for model, figures in sorted(folded.items()):
            for name, metric in gauges.items():
                metric.add_metric([model], figures[name])
        yield from gauges.values()
        yield from self._breaker_families()

    def _breaker_families(self) -> Iterator[Metric]:
        """Workers per model and breaker state, keys per model and key state (folded model names summed)."""
        breakers, keys = self._health.breakers()
        for fam, counts in ((fm.BREAKER_STATE, breakers), (fm.UPSTREAM_KEYS, keys)):
            folded: dict[tuple[str, ...], int] = {}
            for model, by_state in counts.items():
                for state, count in by_state.items():
                    series = fam.fold([model, state])
                    folded[series] = folded.get(series, 0) + count
            metric = _new(fam)
            for series, count in sorted(folded.items()):
                metric.add_metric(list(series), count)
            yield metric

    def _self_families(self) -> Iterator[Metric]:
        agg = self._aggregator
        batches = _new(fm.METRICS_BATCHES)
        for result in ("ok", "duplicate", "unknown", "retired", "invalid"):
            batches.add_metric([result], agg.batches[result])
        series, overflow = _new(fm.METRICS_SERIES), _new(fm.METRICS_OVERFLOW)
        for fam in _PUSHED:
            series.add_metric([fam.name], agg.series_count(fam.name))
            overflow.add_metric([fam.name], agg.overflow(fam.name))
        sources = _new(fm.METRICS_SOURCES)
        sources.add_metric([], agg.live_sources())
        yield from (batches, series, overflow, sources)


class Exposition:
    """Renders a collector as the Prometheus text format (0.0.4)."""

    def __init__(self, collector: MeshCollector) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(collector)  # type: ignore[arg-type]

    def render(self) -> bytes:
        return generate_latest(self._registry)
