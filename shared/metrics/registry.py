"""The metrics of one process: counters, histograms and gauges of declared families.

    metrics = Metrics()
    requests = metrics.counter(REQUESTS)        # or "inferswarm_requests_total"
    requests.inc(service="gateway", method="gateway.infer", code="OK")
    metrics.histogram(REQUEST_DURATION).observe(0.42, service="gateway", method="gateway.infer")
    metrics.gauge(DHT_PEERS).set(7, service="gateway", instance="3fa0c2d19b7e")

Recording is a dict update under an uncontended lock (safe from worker
threads too); nothing here does I/O. The registry keeps every series'
cumulative value since the process started, and the generation of its last
change: a `MetricsReporter` takes a `snapshot` every second, of every series
(for a metrics service it has not brought up to date) or of those changed
since that service's last acknowledged snapshot. Recording never raises on
the request path: a wrong or missing label becomes `"other"` (logged once per
family), a negative or non-finite amount or observation is ignored. Only
asking for an undeclared family, or declaring other labels than the
family's, raises -- at wiring time.

Each handle folds label values by its family's rules and caps its series at
`series_cap`; a new series past the cap goes into the family's all-`"other"`
series, and the samples so folded are counted and reported.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from operator import itemgetter
from collections.abc import Sequence
from typing import Any

from shared.logging import get_logger
from shared.metrics.batch import Batch, Key
from shared.metrics.families import SERIES_CAP, Family, Kind, family

__all__ = ["Metrics", "Counter", "Histogram", "Gauge"]

log = get_logger(__name__)

_NO_KEY = object()


def _no_labels(labels: dict[str, Any]) -> tuple[()]:
    return ()


class _Handle:
    """What the three kinds share: from label keywords to a folded, capped series key."""

    __slots__ = ("family", "_name", "_names", "_values", "_keys", "_series", "_cap", "_owner", "_warned")

    def __init__(self, fam: Family, owner: Metrics, cap: int) -> None:
        self.family = fam
        self._name = fam.name
        self._names = fam.label_names
        self._values = itemgetter(*fam.label_names) if fam.label_names else _no_labels
        self._keys: dict[tuple[Any, ...], tuple[str, ...]] = {}  # raw values -> series key
        self._series: set[tuple[str, ...]] = set()
        self._cap = max(cap, 1)
        self._owner = owner
        self._warned = False

    def _key(self, labels: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        try:
            raw: Any = self._values(labels)  # a tuple, or the one value of a one-label family
            series = self._keys.get(raw)
        except (KeyError, TypeError):  # a missing label, or an unhashable value
            raw, series = _NO_KEY, None
        if series is None or len(labels) != len(self._names):
            series = self._admit(raw, labels)
        return self._name, series

    def _admit(self, raw: Any, labels: dict[str, Any]) -> tuple[str, ...]:
        if not self._warned and set(labels) != set(self._names):
            self._warned = True
            log.warning("metric labels do not match the family", family=self._name,
                        expected=list(self._names), got=sorted(labels))
        series = self.family.fold([labels.get(n) for n in self._names])
        if series not in self._series:
            if len(self._series) >= self._cap - 1 and series != self.family.overflow:
                self._owner._folded_one(self._name)
                self._series.add(self.family.overflow)
                return self.family.overflow  # not cached: every folded sample is counted
            self._series.add(series)
        if raw is not _NO_KEY and len(self._keys) < 4 * self._cap:
            self._keys[raw] = series
        return series


class Counter(_Handle):
    """A monotonically increasing count; its total since the process started is pushed."""

    __slots__ = ()

    def inc(self, amount: float = 1.0, /, **labels: Any) -> None:
        if not (amount > 0 and math.isfinite(amount)):
            return
        key = self._key(labels)
        owner = self._owner
        with owner._lock:
            counters = owner._counters
            counters[key] = counters.get(key, 0.0) + amount
            owner._changed[key] = owner._generation


class Histogram(_Handle):
    """Observations (>= 0: durations, sizes) counted into the family's fixed buckets, with their sum."""

    __slots__ = ()

    def observe(self, value: float, /, **labels: Any) -> None:
        if not (value >= 0 and math.isfinite(value)):  # a negative one would make `_sum` go down
            return
        key = self._key(labels)
        buckets = self.family.buckets
        cell = bisect_left(buckets, value)  # `le`: a value equal to a bound counts in it
        owner = self._owner
        with owner._lock:
            cells = owner._histograms.get(key)
            if cells is None:
                cells = owner._histograms[key] = [0.0] * (len(buckets) + 2)
            cells[cell] += 1
            cells[-1] += value
            owner._changed[key] = owner._generation


class Gauge(_Handle):
    """A value that goes up and down; its current value is sent with every batch."""

    __slots__ = ()

    def set(self, value: float, /, **labels: Any) -> None:
        if not math.isfinite(value):
            return
        key = self._key(labels)
        with self._owner._lock:
            self._owner._gauges[key] = float(value)

    def inc(self, amount: float = 1.0, /, **labels: Any) -> None:
        if not math.isfinite(amount):
            return
        key = self._key(labels)
        gauges = self._owner._gauges
        with self._owner._lock:
            gauges[key] = gauges.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, /, **labels: Any) -> None:
        self.inc(-amount, **labels)


_KINDS: dict[Kind, type[_Handle]] = {Kind.COUNTER: Counter, Kind.HISTOGRAM: Histogram, Kind.GAUGE: Gauge}


class Metrics:
    """The registry of one process: handles by family, cumulative values, what changed when."""

    def __init__(self, *, series_cap: int = SERIES_CAP) -> None:
        self.series_cap = series_cap
        self._lock = threading.Lock()
        self._handles: dict[str, _Handle] = {}
        self._counters: dict[Key, float] = {}
        self._histograms: dict[Key, list[float]] = {}
        self._gauges: dict[Key, float] = {}
        self._folded: dict[str, int] = {}
        #: counter or histogram series -> the generation in which it last changed
        self._changed: dict[Key, int] = {}
        self._generation = 1
        self._drained = Batch()  #: the values at the last `drain`

    def counter(self, name: str | Family, labels: Sequence[str] | None = None) -> Counter:
        """The counter of a declared family (`labels`, if given, must be the family's)."""
        return self._handle(name, labels, Kind.COUNTER)  # type: ignore[return-value]

    def histogram(self, name: str | Family, labels: Sequence[str] | None = None) -> Histogram:
        return self._handle(name, labels, Kind.HISTOGRAM)  # type: ignore[return-value]

    def gauge(self, name: str | Family, labels: Sequence[str] | None = None) -> Gauge:
        return self._handle(name, labels, Kind.GAUGE)  # type: ignore[return-value]

    def snapshot(self, since: int | None = None) -> tuple[int, Batch]:
        """Cumulative values, and the generation to pass as `since` next time.

        `since=None`: every counter and histogram series (a `full` batch);
        otherwise only those changed after the snapshot that returned `since`.
        Either way, every gauge's current value and every fold count."""
        with self._lock:
            generation = self._generation
            self._generation += 1
            if since is None:
                counters, histograms = self._counters, self._histograms
            else:
                changed = [key for key, when in self._changed.items() if when > since]
                counters = {k: self._counters[k] for k in changed if k in self._counters}
                histograms = {k: self._histograms[k] for k in changed if k in self._histograms}
            batch = Batch(dict(counters), {k: cells[:] for k, cells in histograms.items()},
                          dict(self._gauges), dict(self._folded), full=since is None)
        return generation, batch

    def drain(self) -> Batch:
        """What grew since the last `drain`, as deltas, with every gauge's value: for tests and
        inspection in-process (the reporter pushes `snapshot`s, which drain does not disturb)."""
        with self._lock:
            base = self._drained
            batch = Batch(gauges=dict(self._gauges))
            for key, total in self._counters.items():
                if total != base.counters.get(key, 0.0):
                    batch.counters[key] = total - base.counters.get(key, 0.0)
            for key, cells in self._histograms.items():
                before = base.histograms.get(key)
                if before != cells:
                    batch.histograms[key] = cells[:] if before is None else [
                        a - b for a, b in zip(cells, before)]
            for name, count in self._folded.items():
                if count != base.folded.get(name, 0):
                    batch.folded[name] = count - base.folded.get(name, 0)
            self._drained = Batch(dict(self._counters), {k: c[:] for k, c in self._histograms.items()},
                                  folded=dict(self._folded))
        return batch

    def _handle(self, name: str | Family, labels: Sequence[str] | None, kind: Kind) -> _Handle:
        fam = family(name)
        if fam.kind is not kind:
            raise TypeError(f"{fam.name} is a {fam.kind}, not a {kind}")
        handle = self._handles.get(fam.name)
        if handle is None:
            if not fam.pushed:
                raise ValueError(f"{fam.name} is produced by the metrics service, not pushed")
            handle = self._handles.setdefault(fam.name, _KINDS[kind](fam, self, self.series_cap))
        if labels is not None and tuple(labels) != fam.label_names:
            raise ValueError(f"{fam.name} has labels {fam.label_names}, not {tuple(labels)}")
        return handle

    def _folded_one(self, name: str) -> None:
        with self._lock:
            self._folded[name] = self._folded.get(name, 0) + 1
