"""The gateway's metrics, in-process, behind one small interface.

    metrics = Metrics()
    requests = metrics.counter("gateway_requests_total", ("status",))
    requests.inc(status="ok")
    metrics.histogram("gateway_request_seconds", ("status",)).observe(0.012, status="ok")
    metrics.snapshot()   # plain values, for gateway.health and for a reporter

Every family declares its label names once; a sample with other labels is a
bug at wiring time (`ValueError`), and label values are folded to `"other"`
past `max_series` distinct ones, so cardinality stays bounded. No user or key
id is ever a label: those live in PostgreSQL. Shipping these to the metrics
service is another issue's job; this interface is what it will read.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

__all__ = ["Metrics", "Counter", "Histogram", "Gauge", "LATENCY_BUCKETS"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_OTHER = "other"


class _Family:
    __slots__ = ("name", "labels", "max_series", "series")

    def __init__(self, name: str, labels: tuple[str, ...], max_series: int) -> None:
        self.name = name
        self.labels = labels
        self.max_series = max_series
        self.series: dict[tuple[str, ...], Any] = {}

    def key(self, values: dict[str, Any]) -> tuple[str, ...]:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(values)}")
        try:
            key = tuple([str(values[name]) for name in self.labels]) if values else ()
        except KeyError:
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(values)}") from None
        if key not in self.series and len(self.series) >= self.max_series:
            return tuple(_OTHER for _ in self.labels)
        return key


class Counter(_Family):
    """A monotonically increasing count per label set."""

    def inc(self, amount: float = 1, **labels: Any) -> None:
        if amount < 0:
            return
        key = self.key(labels)
        self.series[key] = self.series.get(key, 0) + amount

    def value(self, **labels: Any) -> float:
        return self.series.get(self.key(labels), 0)


class Gauge(_Family):
    """A current value per label set."""

    def set(self, value: float, **labels: Any) -> None:
        self.series[self.key(labels)] = value

    def value(self, **labels: Any) -> float:
        return self.series.get(self.key(labels), 0)


class Histogram(_Family):
    """Counts per bucket (upper bounds), plus count and sum, per label set."""

    __slots__ = ("buckets",)

    def __init__(self, name: str, labels: tuple[str, ...], max_series: int, buckets: tuple[float, ...]) -> None:
        super().__init__(name, labels, max_series)
        self.buckets = buckets

    def observe(self, value: float, **labels: Any) -> None:
        key = self.key(labels)
        entry = self.series.get(key)
        if entry is None:
            entry = self.series[key] = [[0] * (len(self.buckets) + 1), 0, 0.0]
        entry[0][bisect_left(self.buckets, value)] += 1
        entry[1] += 1
        entry[2] += value

    def quantile(self, q: float, **labels: Any) -> float | None:
        """The upper bound of the bucket holding the q-quantile (None without samples)."""
        entry = self.series.get(self.key(labels))
        if not entry or not entry[1]:
            return None
        rank, seen = q * entry[1], 0
        for bound, count in zip((*self.buckets, float("inf")), entry[0]):
            seen += count
            if seen >= rank:
                return bound
        return float("inf")


class Metrics:
    """The families of one process, by name."""

    def __init__(self, *, max_series: int = 200) -> None:
        self._max_series = max_series
        self._families: dict[str, _Family] = {}

    def counter(self, name: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._get(name, Counter, labels)  # type: ignore[return-value]

    def gauge(self, name: str, labels: tuple[str, ...] = ()) -> Gauge:
        return self._get(name, Gauge, labels)  # type: ignore[return-value]

    def histogram(self, name: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS
                  ) -> Histogram:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = Histogram(name, labels, self._max_series, buckets)
        return self._check(family, Histogram, labels)  # type: ignore[return-value]

    def _get(self, name: str, kind: type[_Family], labels: tuple[str, ...]) -> _Family:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = kind(name, labels, self._max_series)
        return self._check(family, kind, labels)

    @staticmethod
    def _check(family: _Family, kind: type[_Family], labels: tuple[str, ...]) -> _Family:
        if type(family) is not kind or family.labels != labels:
            raise ValueError(f"{family.name} is already a {type(family).__name__} with labels {family.labels}")
        return family

    def snapshot(self) -> dict[str, Any]:
        """Every series as plain values: {name: {"label=value,...": value}}."""
        view: dict[str, Any] = {}
        for name, family in self._families.items():
            series = {}
            for key, value in family.series.items():
                label = ",".join(f"{n}={v}" for n, v in zip(family.labels, key))
                if isinstance(family, Histogram):
                    value = {"count": value[1], "sum": round(value[2], 6),
                             "buckets": dict(zip([*map(str, family.buckets), "+Inf"], value[0]))}
                series[label] = value
            view[name] = series
        return view
