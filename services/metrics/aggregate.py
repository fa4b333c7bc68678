"""The mesh's pushed metrics, aggregated: what `/metrics` shows for pushed families.

* **Counters and histograms** are sums of every delta ever applied, so they
  only go up whatever the reporters do (restart, die, come back).
* **Gauges** hold each reporting node's latest value (by service and
  instance, so a restarted process replaces its own values); the exposed
  value is the sum over nodes heard from within `gauge_ttl` seconds. A node
  that stops reporting stops counting.
* **Exactly once**: a batch is applied only if its `seq` is above the last
  one applied for its source (`Source.id`, one per process run); a resent
  batch is acknowledged as a duplicate. At most `max_sources` sources are
  remembered (least recently heard from forgotten first).
* **Bounded**: at most `series_cap` series per family. A new series past the
  cap is folded into the family's all-"other" series (counters, histograms)
  or dropped (gauges: a sum of unrelated values means nothing), and counted.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Literal

from shared.metrics.batch import Batch, Key, Source
from shared.metrics.families import FAMILIES

__all__ = ["Aggregator"]

Series = tuple[str, ...]
Node = tuple[str, str]  # (service, instance)


class Aggregator:
    """Applies validated batches; answers the exposition's questions."""

    def __init__(
        self, *, series_cap: int = 1000, gauge_ttl: float = 15.0, max_sources: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.series_cap = max(series_cap, 2)
        self.gauge_ttl = gauge_ttl
        self.max_sources = max_sources
        self._clock = clock
        self.counters: dict[str, dict[Series, float]] = {}
        self.histograms: dict[str, dict[Series, list[float]]] = {}
        #: family -> series -> node -> (value, when)
        self._gauges: dict[str, dict[Series, dict[Node, tuple[float, float]]]] = {}
        self._sources: OrderedDict[str, tuple[int, float]] = OrderedDict()  # id -> (seq, when)
        self.overflow: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()

    def apply(self, source: Source, seq: int, batch: Batch) -> Literal["ok", "duplicate"]:
        """Apply a batch once; a seq not above the source's last is a duplicate."""
        now = self._clock()
        last = self._sources.get(source.id)
        if last is not None and seq <= last[0]:
            self._sources[source.id] = (last[0], now)
            self._sources.move_to_end(source.id)
            self.batches["duplicate"] += 1
            return "duplicate"
        self._sources[source.id] = (seq, now)
        self._sources.move_to_end(source.id)
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        for (name, labels), delta in batch.counters.items():
            table = self.counters.setdefault(name, {})
            series = self._admit(name, table, labels)
            table[series] = table.get(series, 0.0) + delta
        for (name, labels), cells in batch.histograms.items():
            table = self.histograms.setdefault(name, {})
            series = self._admit(name, table, labels)
            mine = table.get(series)
            table[series] = cells[:] if mine is None else [a + b for a, b in zip(mine, cells)]
        node = (source.service, source.instance)
        for key, value in batch.gauges.items():
            self._set_gauge(key, node, value, now)
        for name, count in batch.folded.items():
            self.overflow[name] += count
        self.batches["ok"] += 1
        return "ok"

    def invalid(self) -> None:
        """Count a batch refused by validation."""
        self.batches["invalid"] += 1

    def gauges(self, name: str) -> dict[Series, float]:
        """A gauge family's live values: per series, the sum over nodes heard from lately."""
        horizon = self._clock() - self.gauge_ttl
        table = self._gauges.get(name, {})
        values = {}
        for series, nodes in list(table.items()):
            for node, (_, when) in list(nodes.items()):
                if when < horizon:
                    del nodes[node]
            if nodes:
                values[series] = sum(value for value, _ in nodes.values())
            else:
                del table[series]
        return values

    def series_count(self, name: str) -> int:
        return len(self.counters.get(name, ())) + len(self.histograms.get(name, ())) + len(
            self._gauges.get(name, ()))

    def live_sources(self) -> int:
        """Reporting processes heard from within `gauge_ttl` seconds."""
        horizon = self._clock() - self.gauge_ttl
        return sum(1 for _, when in self._sources.values() if when >= horizon)

    def _admit(self, name: str, table: dict[Series, object], series: Series) -> Series:
        overflow = FAMILIES[name].overflow
        if series in table or series == overflow or len(table) < self.series_cap - 1:
            return series
        self.overflow[name] += 1
        return overflow

    def _set_gauge(self, key: Key, node: Node, value: float, now: float) -> None:
        name, series = key
        table = self._gauges.setdefault(name, {})
        nodes = table.get(series)
        if nodes is None:
            if len(table) >= self.series_cap:
                self.overflow[name] += 1
                return
            nodes = table[series] = {}
        nodes[node] = (value, now)
