"""The mesh's pushed metrics, aggregated: what `/metrics` shows for pushed families.

Every reporter pushes its process's cumulative values (shared/metrics/batch.py)
to every metrics service, so each service can hold the same picture:

* **Per source** (`Source.id`, one per process run) the latest cumulative
  value of each counter series and histogram cell, and its fold counts. A
  `full` push sets them; a partial one updates the series it names. A partial
  push from a source this service does not hold (it restarted, or the source
  is new to it) is answered `unknown` and not applied: the reporter sends a
  full snapshot next, so a source's values here are always a whole state.
* **A value that goes down within one source is ignored** (the series keeps
  its higher value, counted in `regressions`): a process's totals only grow.
* **Exposed** counters and histograms: per series, the sum over sources plus
  a `retired` base. A source not heard from for `retention` seconds, or the
  least recently heard when more than `max_sources` are held, is retired: its
  values are added to the base and its id remembered (as many as
  `max_sources`), so a later push from it is answered `retired`, not counted
  twice. Exposed values never go backwards: each is also kept as a high-water
  mark (a float sum regrouped at retirement may differ by a rounding step).
* **Exactly once, in order**: a push is applied only if its `seq` is above
  the last one applied for its source; a stale or resent one is acknowledged
  as `duplicate` and ignored (with cumulative values, applying an older push
  after a newer one would take values back).
* **Gauges** hold each reporting node's latest value (by service and
  instance, so a restarted process replaces its own values); the exposed
  value is the sum over nodes heard from within `gauge_ttl` seconds.
* **Bounded**: at most `series_cap` series per family are exposed. A new
  series past the cap is exposed in the family's all-"other" series (counters,
  histograms; the mapping is fixed the first time the series is seen) or
  dropped (gauges), and counted in `overflow`. A source holds at most
  `source_cap` series per family (a reporter keeps 500); more are dropped and
  counted. So memory is bounded by `max_sources` x families x `source_cap`.

Two services that heard every live source's latest push expose the same
totals for them; one started late lacks only sources that died before it
started (their values never reached it).
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from shared.metrics.batch import Batch, Key, Source
from shared.metrics.families import FAMILIES, SERIES_CAP

__all__ = ["Aggregator", "Result"]

Series = tuple[str, ...]
Node = tuple[str, str]  # (service, instance)
Result = Literal["ok", "duplicate", "unknown", "retired"]


@dataclass(slots=True)
class _Held:
    """One source's latest values, per family and series."""

    seq: int
    heard: float
    counters: dict[str, dict[Series, list[float]]] = field(default_factory=dict)  #: [total]
    histograms: dict[str, dict[Series, list[float]]] = field(default_factory=dict)
    folded: dict[str, int] = field(default_factory=dict)


class Aggregator:
    """Applies validated pushes; answers the exposition's questions."""

    def __init__(
        self, *, series_cap: int = 1000, gauge_ttl: float = 15.0, max_sources: int = 4096,
        retention: float = 3600.0, source_cap: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.series_cap = max(series_cap, 2)
        self.gauge_ttl = gauge_ttl
        self.max_sources = max(max_sources, 1)
        self.retention = retention
        self.source_cap = source_cap or max(self.series_cap, SERIES_CAP)
        self._clock = clock
        self._sources: OrderedDict[str, _Held] = OrderedDict()  # least recently heard first
        self._retired_ids: OrderedDict[str, None] = OrderedDict()
        #: family -> series admitted for exposure (the all-"other" one included once used)
        self._admitted: dict[str, set[Series]] = {}
        self._retired_counters: dict[str, dict[Series, list[float]]] = {}
        self._retired_histograms: dict[str, dict[Series, list[float]]] = {}
        self._retired_folded: Counter[str] = Counter()
        self._high: dict[tuple[str, Series], list[float]] = {}  # what was last exposed
        #: family -> series -> node -> (value, when)
        self._gauges: dict[str, dict[Series, dict[Node, tuple[float, float]]]] = {}
        self.folded_here: Counter[str] = Counter()  #: series folded or dropped by this service's caps
        self.batches: Counter[str] = Counter()
        self.regressions = 0  #: values below what their source sent before, ignored

    def apply(self, source: Source, seq: int, batch: Batch) -> Result:
        """Apply one push once, in order; see the module doc for each answer."""
        now = self._clock()
        self.expire(now)
        held = self._sources.get(source.id)
        if held is None:
            if source.id in self._retired_ids:
                return self._answer("retired")
            if not batch.full:
                return self._answer("unknown")
            held = self._sources[source.id] = _Held(seq=-1, heard=now)
            while len(self._sources) > self.max_sources:
                self._retire(next(iter(self._sources)))
        held.heard = now
        self._sources.move_to_end(source.id)
        if seq <= held.seq:
            return self._answer("duplicate")
        held.seq = seq
        self._take(held, source, batch, now)
        return self._answer("ok")

    def invalid(self) -> None:
        """Count a batch refused by validation."""
        self.batches["invalid"] += 1

    def expire(self, now: float | None = None) -> None:
        """Retire the sources not heard from for `retention` seconds."""
        horizon = (self._clock() if now is None else now) - self.retention
        while self._sources:
            oldest, held = next(iter(self._sources.items()))
            if held.heard >= horizon:
                return
            self._retire(oldest)

    def counters(self, name: str) -> dict[Series, float]:
        """A counter family's exposed values: per series, retired base plus every source's total."""
        exposed = self._exposed(name, self._retired_counters, lambda h: h.counters)
        return {series: cells[0] for series, cells in exposed.items()}

    def histograms(self, name: str) -> dict[Series, list[float]]:
        """A histogram family's exposed cells: [count per bucket..., count above the last, sum]."""
        return self._exposed(name, self._retired_histograms, lambda h: h.histograms)

    def overflow(self, name: str) -> int:
        """Samples folded by reporters' caps (live and retired sources) and series folded here."""
        reported = sum(held.folded.get(name, 0) for held in self._sources.values())
        return reported + self._retired_folded[name] + self.folded_here[name]

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
        return len(self._admitted.get(name, ())) + len(self._gauges.get(name, ()))

    def live_sources(self) -> int:
        """Reporting processes heard from within `gauge_ttl` seconds."""
        horizon = self._clock() - self.gauge_ttl
        return sum(1 for held in self._sources.values() if held.heard >= horizon)

    @property
    def sources(self) -> int:
        """Sources held (not retired)."""
        return len(self._sources)

    def _take(self, held: _Held, source: Source, batch: Batch, now: float) -> None:
        for (name, series), total in batch.counters.items():
            self._set(held.counters, name, series, [total])
        for (name, series), cells in batch.histograms.items():
            self._set(held.histograms, name, series, cells)
        for name, count in batch.folded.items():
            held.folded[name] = max(held.folded.get(name, 0), count)
        node = (source.service, source.instance)
        for key, value in batch.gauges.items():
            self._set_gauge(key, node, value, now)

    def _answer(self, result: Result) -> Result:
        self.batches[result] += 1
        return result

    def _set(self, table: dict[str, dict[Series, list[float]]], name: str, series: Series,
             cells: list[float]) -> None:
        mine = table.setdefault(name, {})
        old = mine.get(series)
        if old is None:
            if len(mine) >= self.source_cap:
                self.folded_here[name] += 1  # dropped: a reporter that does not fold its series
                return
            self._admit(name, series)
        elif any(new < was for new, was in zip(cells, old)):
            self.regressions += 1
            return
        mine[series] = cells[:]

    def _admit(self, name: str, series: Series) -> None:
        admitted = self._admitted.setdefault(name, set())
        overflow = FAMILIES[name].overflow
        if series in admitted:
            return
        if series != overflow and len(admitted) >= self.series_cap - 1:
            self.folded_here[name] += 1
            series = overflow
        admitted.add(series)

    def _exposed_series(self, name: str, series: Series) -> Series:
        return series if series in self._admitted.get(name, ()) else FAMILIES[name].overflow

    def _exposed(self, name: str, retired: dict[str, dict[Series, list[float]]],
                 of: Callable[[_Held], dict[str, dict[Series, list[float]]]]) -> dict[Series, list[float]]:
        parts: dict[Series, list[list[float]]] = {}
        for series, cells in retired.get(name, {}).items():
            parts.setdefault(series, []).append(cells)
        for held in self._sources.values():
            for series, cells in of(held).get(name, {}).items():
                parts.setdefault(self._exposed_series(name, series), []).append(cells)
        exposed = {}
        for series, rows in parts.items():
            sums = [math.fsum(column) for column in zip(*rows)]  # exact: the same in any order
            high = self._high.get((name, series))
            if high is not None:
                sums = [max(a, b) for a, b in zip(sums, high)]
            self._high[(name, series)] = exposed[series] = sums
        return exposed

    def _retire(self, source_id: str) -> None:
        held = self._sources.pop(source_id)
        self._retired_ids[source_id] = None
        while len(self._retired_ids) > self.max_sources:
            self._retired_ids.popitem(last=False)
        for retired, mine in ((self._retired_counters, held.counters),
                              (self._retired_histograms, held.histograms)):
            for name, table in mine.items():
                into = retired.setdefault(name, {})
                for series, cells in table.items():
                    target = self._exposed_series(name, series)
                    base = into.get(target)
                    into[target] = cells[:] if base is None else [a + b for a, b in zip(base, cells)]
        self._retired_folded.update(held.folded)

    def _set_gauge(self, key: Key, node: Node, value: float, now: float) -> None:
        name, series = key
        table = self._gauges.setdefault(name, {})
        nodes = table.get(series)
        if nodes is None:
            if len(table) >= self.series_cap:
                self.folded_here[name] += 1
                return
            nodes = table[series] = {}
        nodes[node] = (value, now)
