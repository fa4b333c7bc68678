"""The aggregator and the reporter in one process: cumulative values per source,
retired sources, stale pushes, full and partial snapshots, and a reporter that
pushes to several metrics services at once, one of them dead.

The services here are real `MetricsService`s with real `Aggregator`s, called
through `LocalSender` (the metrics process's own path); the dead one is a
`Sender` that never answers, as a crashed process behind a kept-open
connection does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from typing import Any

import pytest

from services.metrics.aggregate import Aggregator
from services.metrics.app import LocalSender
from services.metrics.service import MetricsService
from shared.metrics import (
    REQUEST_DURATION,
    REQUESTS,
    TOKENS,
    Batch,
    Metrics,
    MetricsReporter,
    OneDestination,
    Sender,
    Source,
)

pytestmark = pytest.mark.unit

INFER = ("gateway", "gateway.infer", "OK")
KEY = (REQUESTS.name, INFER)
A = Source("gateway", "0123456789ab", "run-a")
B = Source("inference", "ba9876543210", "run-b")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def push(total: float, *, full: bool = True, **more: Any) -> Batch:
    return Batch(counters={KEY: total, **more}, full=full)


def test_the_exposed_total_is_the_sum_of_each_sources_latest_value():
    agg = Aggregator()
    assert agg.apply(A, 1, push(3)) == "ok"
    assert agg.apply(B, 1, push(4)) == "ok"
    assert agg.apply(A, 2, push(5, full=False)) == "ok"  # a total, not +5
    assert agg.counters(REQUESTS.name) == {INFER: 9.0}


def test_a_stale_push_is_a_duplicate_and_a_counter_never_goes_down():
    agg = Aggregator()
    agg.apply(A, 5, push(10))
    assert agg.apply(A, 4, push(7, full=False)) == "duplicate"  # a late push: ignored
    assert agg.apply(A, 5, push(7, full=False)) == "duplicate"
    assert agg.apply(A, 6, push(8, full=False)) == "ok"  # in order but lower: that series ignored
    assert agg.regressions == 1
    assert agg.counters(REQUESTS.name) == {INFER: 10.0}
    assert agg.batches == {"ok": 2, "duplicate": 2}


def test_a_partial_push_from_an_unknown_source_is_not_applied():
    agg = Aggregator()
    assert agg.apply(A, 3, push(10, full=False)) == "unknown"
    assert agg.counters(REQUESTS.name) == {}
    assert agg.apply(A, 4, push(11)) == "ok"  # the full snapshot that follows
    assert agg.counters(REQUESTS.name) == {INFER: 11.0}


def test_a_full_snapshot_brings_a_late_service_to_the_same_totals():
    early, late = Aggregator(), Aggregator()
    duration = (REQUEST_DURATION.name, ("gateway", "m"))
    cells = [1.0] + [0.0] * len(REQUEST_DURATION.buckets) + [0.1]
    for seq in range(1, 11):  # the early one hears every push, the late one only the last, full
        cells = [cells[0] + 1, *cells[1:-1], cells[-1] + 0.1]
        early.apply(A, seq, Batch(counters={KEY: float(seq)}, histograms={duration: cells[:]}, full=seq == 1))
    late.apply(A, 10, Batch(counters={KEY: 10.0}, histograms={duration: cells[:]}))
    assert early.counters(REQUESTS.name) == late.counters(REQUESTS.name) == {INFER: 10.0}
    assert early.histograms(REQUEST_DURATION.name) == late.histograms(REQUEST_DURATION.name)


def test_retired_sources_keep_their_totals_and_are_not_counted_twice():
    clock = Clock()
    agg = Aggregator(retention=60.0, max_sources=2, clock=clock)
    agg.apply(A, 1, push(5))
    clock.now += 30
    agg.apply(B, 1, push(7))
    clock.now += 31  # A silent for 61 s: retired on the next look
    agg.expire()
    assert agg.sources == 1 and agg.counters(REQUESTS.name) == {INFER: 12.0}
    assert agg.apply(A, 2, push(9)) == "retired"  # back after its retirement: not added again
    assert agg.counters(REQUESTS.name) == {INFER: 12.0}
    c, d = Source("web", "0123456789ab", "run-c"), Source("web", "0123456789ab", "run-d")
    agg.apply(c, 1, push(1))
    agg.apply(d, 1, push(1))  # a third live source: B, the least recently heard, is retired
    assert agg.sources == 2 and agg.apply(B, 2, push(8, full=False)) == "retired"
    assert agg.counters(REQUESTS.name) == {INFER: 14.0}
    assert agg.batches["retired"] == 2


def test_exposed_values_never_go_backwards_when_float_totals_are_regrouped():
    clock = Clock()
    agg = Aggregator(retention=10.0, clock=clock)
    seen = []
    for i in range(50):  # fractional totals: regrouping them may round differently
        agg.apply(Source("gateway", "0123456789ab", f"run-{i}"), 1,
                  Batch(counters={(TOKENS.name, ("m", "in")): 0.1 * (i % 7) + 1e-9 * i}))
        seen.append(agg.counters(TOKENS.name)[("m", "in")])
        clock.now += 1  # sources retire one after another
    agg.expire()
    seen.append(agg.counters(TOKENS.name)[("m", "in")])
    assert seen == sorted(seen)


def test_series_past_the_cap_are_exposed_as_other_and_totals_kept():
    agg = Aggregator(series_cap=3)
    agg.apply(A, 1, Batch(counters={(TOKENS.name, (f"m{i}", "in")): 1.0 for i in range(5)}))
    agg.apply(B, 1, Batch(counters={(TOKENS.name, (f"m{i}", "in")): 2.0 for i in range(5)}))
    exposed = agg.counters(TOKENS.name)
    assert len(exposed) == 3 and sum(exposed.values()) == 15
    assert exposed[("other", "other")] == 9  # m2, m3, m4 of both sources
    assert agg.overflow(TOKENS.name) == 6  # counted once per source and folded series


def test_a_source_holds_at_most_source_cap_series_per_family():
    agg = Aggregator(series_cap=1000, source_cap=10)
    agg.apply(A, 1, Batch(counters={(TOKENS.name, (f"m{i}", "in")): 1.0 for i in range(25)}))
    assert sum(agg.counters(TOKENS.name).values()) == 10
    assert agg.overflow(TOKENS.name) == 15  # dropped, counted


# -- the reporter ------------------------------------------------------------------


def service(**options: Any) -> tuple[Aggregator, LocalSender]:
    aggregator = Aggregator(**options)
    return aggregator, LocalSender(MetricsService(aggregator, None))  # type: ignore[arg-type]  # no health asked


class Hung:
    """A metrics service that accepted the connection and never answers (killed mid-call)."""

    calls = 0

    async def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 10.0) -> Any:
        self.calls += 1
        await asyncio.sleep(3600)


class Listing:
    """The directory the test edits: which services the reporter finds."""

    def __init__(self, **senders: Sender) -> None:
        self.senders: dict[Hashable, Sender] = dict(senders)

    async def destinations(self, timeout: float) -> dict[Hashable, Sender]:
        return dict(self.senders)


async def test_a_reporter_pushes_to_every_service_and_one_dead_never_holds_up_the_others():
    (one, to_one), (two, to_two), dead = service(), service(), Hung()
    listing = Listing(one=to_one, two=to_two, dead=dead)
    metrics = Metrics()
    reporter = MetricsReporter(metrics, listing, service="gateway", instance="0123456789ab", timeout=0.3)
    metrics.counter(TOKENS).inc(4, model="m", direction="in")
    started = time.monotonic()
    assert not await reporter.flush()  # the dead one failed
    assert time.monotonic() - started < 1.0  # bounded by the timeout, not by the dead service
    assert one.counters(TOKENS.name) == two.counters(TOKENS.name) == {("m", "in"): 4.0}
    assert reporter.behind == 1 and dead.calls == 1
    del listing.senders["dead"]  # its record expired: forgotten
    metrics.counter(TOKENS).inc(3, model="m", direction="in")
    assert await reporter.flush() and reporter.destinations == 2 and dead.calls == 1
    assert one.counters(TOKENS.name) == two.counters(TOKENS.name) == {("m", "in"): 7.0}


async def test_a_restarted_or_new_service_gets_a_full_snapshot():
    (first, to_first), (later, to_later) = service(), service()
    listing = Listing(first=to_first)
    metrics = Metrics()
    reporter = MetricsReporter(metrics, listing, service="gateway", instance="0123456789ab")
    metrics.counter(TOKENS).inc(5, model="n", direction="out")
    metrics.counter(TOKENS).inc(9, model="m", direction="in")
    assert await reporter.flush()
    metrics.counter(TOKENS).inc(1, model="n", direction="out")
    listing.senders["later"] = to_later  # started late: its first push is full
    assert await reporter.flush()
    assert later.counters(TOKENS.name) == first.counters(TOKENS.name) == {("n", "out"): 6.0, ("m", "in"): 9.0}
    listing.senders["first"] = to_first = service()[1]  # restarted on the same key: it knows nothing
    restarted = to_first._service._aggregator  # type: ignore[attr-defined]
    metrics.counter(TOKENS).inc(1, model="n", direction="out")
    assert not await reporter.flush()  # a partial push: "unknown" there
    assert restarted.batches["unknown"] == 1 and restarted.counters(TOKENS.name) == {}
    assert await reporter.flush()  # the full snapshot
    assert restarted.counters(TOKENS.name) == later.counters(TOKENS.name) == {("n", "out"): 7.0, ("m", "in"): 9.0}


async def test_a_reporter_with_no_service_keeps_nothing_but_its_registry():
    aggregator, sender = service()
    listing = Listing()
    metrics = Metrics()
    async with MetricsReporter(metrics, listing, service="web", instance="0123456789ab", interval=0.05) as reporter:
        for _ in range(100):
            metrics.counter(TOKENS).inc(model="w", direction="in")
        assert not await reporter.flush() and reporter.destinations == 0
        listing.senders["only"] = sender
    # the push at exit reached it
    assert aggregator.counters(TOKENS.name) == {("w", "in"): 100.0}
    assert reporter.failed == 0 and reporter.dropped == 0


async def test_one_destination_wraps_a_single_sender():
    aggregator, sender = service()
    metrics = Metrics()
    reporter = MetricsReporter(metrics, OneDestination(sender), service="web", instance="0123456789ab")
    metrics.counter(TOKENS).inc(model="w", direction="in")
    assert await reporter.flush() and reporter.sent == 1
    assert aggregator.counters(TOKENS.name) == {("w", "in"): 1.0}


async def test_a_service_that_retired_the_source_is_not_pushed_to_again_for_a_while():
    aggregator, sender = service(max_sources=1)
    metrics = Metrics()
    reporter = MetricsReporter(metrics, OneDestination(sender), service="web", instance="0123456789ab")
    metrics.counter(TOKENS).inc(model="w", direction="in")
    assert await reporter.flush()
    aggregator.apply(B, 1, push(2))  # another source: only one is held, ours is retired
    assert not await reporter.flush()
    assert not await reporter.flush() and aggregator.batches["retired"] == 1  # not asked again yet
    assert aggregator.counters(TOKENS.name) == {("w", "in"): 1.0}  # held in the retired base
    assert aggregator.counters(REQUESTS.name) == {INFER: 2.0}
