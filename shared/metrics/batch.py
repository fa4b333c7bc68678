"""What a reporter pushes to `metrics.record`: its process's cumulative values.

On the wire (msgpack, the `batch` parameter of `metrics.record`), version 2::

    {"v": 2,
     "source": {"service": "gateway", "instance": "3fa0c2d19b7e", "id": "<random hex per process>"},
     "seq": 42,           # per source, +1 per push round (every destination of a round gets the same)
     "full": true,        # true: every series of the source; false: those changed since the
                          # destination's last acknowledged push
     "counters":   [[family, [label values], total], ...],            # since the process started, >= 0
     "histograms": [[family, [label values], [count per bucket..., count over the last], sum], ...],
                                                                        # cumulative too; counts, sum >= 0
     "gauges":     [[family, [label values], value], ...],            # current values, absolute
     "folded":     [[family, samples folded by the reporter's series cap since it started], ...]}

Values are cumulative per source (a process run), never deltas, so any number
of metrics services can each hold the latest values of every source and show
the same totals (services/metrics/aggregate.py). A service ignores a total
lower than the one it holds for that source and series (the rest of the batch
applies); a partial push from a source it does not hold is answered `unknown`.
Version 1 (deltas) is refused.

Label values are in the family's declared order. `parse_batch` validates a
received batch completely (known pushed families, kinds, label counts, finite
numbers >= 0 for counters and histograms, at most `MAX_ENTRIES` entries) before
anything is applied, and folds label values again on the service side, so a
reporter that skips the folding still cannot add labels outside the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from shared.errors import InvalidParams
from shared.metrics.families import FAMILIES, Family, Kind

__all__ = ["VERSION", "MAX_ENTRIES", "Key", "Source", "Batch", "parse_batch"]

VERSION = 2
#: Entries per batch; a reporter's own series caps keep it far below.
MAX_ENTRIES = 20_000
_MAX_TEXT = 64

#: (family name, folded label values)
Key = tuple[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Source:
    """Who sent a batch: the service, the node (`instance`), and this process run (`id`)."""

    service: str
    instance: str
    id: str

    def to_wire(self) -> dict[str, str]:
        return {"service": self.service, "instance": self.instance, "id": self.id}


@dataclass(slots=True)
class Batch:
    """Cumulative counter and histogram values, gauge values, fold counts; `full` or partial."""

    counters: dict[Key, float] = field(default_factory=dict)
    #: Per key: [count in each bucket..., count above the last bucket, sum of observations]
    histograms: dict[Key, list[float]] = field(default_factory=dict)
    gauges: dict[Key, float] = field(default_factory=dict)
    folded: dict[str, int] = field(default_factory=dict)
    #: True: every series of the source; False: only those changed since an earlier push
    full: bool = True

    def __len__(self) -> int:
        return len(self.counters) + len(self.histograms) + len(self.gauges) + len(self.folded)

    def to_wire(self, source: Source, seq: int) -> dict[str, Any]:
        return {
            "v": VERSION,
            "source": source.to_wire(),
            "seq": seq,
            "full": self.full,
            "counters": [[name, list(labels), total] for (name, labels), total in self.counters.items()],
            "histograms": [
                [name, list(labels), [int(c) for c in cells[:-1]], cells[-1]]
                for (name, labels), cells in self.histograms.items()
            ],
            "gauges": [[name, list(labels), value] for (name, labels), value in self.gauges.items()],
            "folded": [[name, count] for name, count in self.folded.items()],
        }


def parse_batch(wire: Any, *, max_entries: int = MAX_ENTRIES) -> tuple[Source, int, Batch]:
    """A received batch checked and folded; `InvalidParams` names the first problem.

    Two entries that fold into the same series are summed (each is a total of
    its own label values)."""
    if not isinstance(wire, dict) or wire.get("v") != VERSION:
        raise InvalidParams(f"batch must be a map with v={VERSION}", {"param": "batch"})
    source = _source(wire.get("source"))
    seq = wire.get("seq")
    if type(seq) is not int or not 0 <= seq < 2**63:
        raise InvalidParams("batch.seq must be an integer >= 0", {"param": "batch"})
    full = wire.get("full")
    if type(full) is not bool:
        raise InvalidParams("batch.full must be true or false", {"param": "batch"})
    sections = {name: wire.get(name, []) for name in ("counters", "histograms", "gauges", "folded")}
    for name, entries in sections.items():
        if not isinstance(entries, list):
            raise InvalidParams(f"batch.{name} must be a list", {"param": "batch"})
    if sum(len(entries) for entries in sections.values()) > max_entries:
        raise InvalidParams(f"a batch holds at most {max_entries} entries", {"param": "batch"})
    batch = Batch(full=full)
    for i, entry in enumerate(sections["counters"]):
        fam, labels, total = _entry(entry, Kind.COUNTER, 3, f"counters[{i}]")
        if not _finite(total) or total < 0:
            raise InvalidParams(f"batch.counters[{i}]: a total must be a finite number >= 0")
        key = (fam.name, _labels(fam, labels, f"counters[{i}]"))
        batch.counters[key] = batch.counters.get(key, 0.0) + float(total)
    for i, entry in enumerate(sections["histograms"]):
        fam, labels, counts, total = _entry(entry, Kind.HISTOGRAM, 4, f"histograms[{i}]")
        cells = _histogram(fam, counts, total, f"histograms[{i}]")
        key = (fam.name, _labels(fam, labels, f"histograms[{i}]"))
        mine = batch.histograms.get(key)
        batch.histograms[key] = cells if mine is None else [a + b for a, b in zip(mine, cells)]
    for i, entry in enumerate(sections["gauges"]):
        fam, labels, value = _entry(entry, Kind.GAUGE, 3, f"gauges[{i}]")
        if not _finite(value):
            raise InvalidParams(f"batch.gauges[{i}]: a value must be a finite number")
        batch.gauges[(fam.name, _labels(fam, labels, f"gauges[{i}]"))] = float(value)
    for i, entry in enumerate(sections["folded"]):
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in FAMILIES
                and type(entry[1]) is int and 0 <= entry[1] < 2**53):
            raise InvalidParams(f"batch.folded[{i}] must be [family, count]")
        batch.folded[entry[0]] = batch.folded.get(entry[0], 0) + entry[1]
    return source, seq, batch


def _source(raw: Any) -> Source:
    if isinstance(raw, dict):
        values: list[Any] = [raw.get(name) for name in ("service", "instance", "id")]
        if all(type(v) is str and 0 < len(v) <= _MAX_TEXT for v in values):
            return Source(*values)
    raise InvalidParams("batch.source must be {service, instance, id} (short strings)", {"param": "batch"})


def _entry(entry: Any, kind: Kind, size: int, where: str) -> tuple[Any, ...]:
    if not isinstance(entry, list) or len(entry) != size:
        raise InvalidParams(f"batch.{where} must be a list of {size} items")
    fam = FAMILIES.get(entry[0]) if type(entry[0]) is str else None
    if fam is None or fam.kind is not kind or not fam.pushed:
        raise InvalidParams(f"batch.{where}: {str(entry[0])[:80]!r} is not a pushed {kind} family")
    return (fam, *entry[1:])


def _labels(fam: Family, values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or len(values) != len(fam.labels):
        raise InvalidParams(f"batch.{where}: {fam.name} takes labels {list(fam.label_names)}")
    return fam.fold(values)


def _histogram(fam: Family, counts: Any, total: Any, where: str) -> list[float]:
    if (not isinstance(counts, list) or len(counts) != len(fam.buckets) + 1
            or not all(type(c) is int and 0 <= c < 2**53 for c in counts)):
        raise InvalidParams(f"batch.{where}: {len(fam.buckets) + 1} bucket counts (integers >= 0) expected")
    if not _finite(total) or total < 0:
        raise InvalidParams(f"batch.{where}: the sum must be a finite number >= 0")
    return [*map(float, counts), float(total)]


def _finite(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and abs(value) < 2**63

